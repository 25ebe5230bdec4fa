//! The scope map page, rendered by headless Chromium (Debian's `chromium`, which set-up
//! installs) against a running aq with scopes on two groups: every scope with its group and
//! policy, rates that rise after writes, denies counted, a screenshot under `target/` for a
//! person to look at, and with a wrong token the login prompt and no data.

use std::process::Command;

use aq_tests::etcd::TestGateway;

/// The page's DOM once its scripts have run, as Chromium renders it at `url`; with
/// `screenshot`, also a picture of it there.
fn render(url: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut chromium = Command::new("chromium");
    chromium.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        // Let the page's scripts fetch and draw before the DOM is taken.
        "--virtual-time-budget=3000",
    ]);
    chromium.arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => chromium.arg(format!("--screenshot={}", path.display())),
        None => chromium.arg("--dump-dom"),
    };
    let output = chromium.arg(url).output().expect("chromium runs (scripts/setup.sh installs it)");
    assert!(output.status.success(), "chromium: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The DOM `render` gives once it holds `marker`: Chromium's time budget is virtual, so on a busy
/// machine the page can be taken before its first event is drawn; it is rendered again then.
fn render_with(url: &str, marker: &str) -> String {
    let mut dom = String::new();
    for _ in 0..10 {
        dom = render(url, None);
        if dom.contains(marker) {
            return dom;
        }
    }
    panic!("{marker} never drawn:\n{dom}");
}

/// The text of the first element after `marker` in `dom`.
fn text_after<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)? + marker.len();
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(&rest[start..end])
}

/// The `data-…` marker of the scope `id`'s box, up to its rates.
fn scope_section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("data-scope=\"{id}\"")).unwrap_or_else(|| panic!("scope {id} is drawn:\n{dom}"));
    let rest = &dom[start..];
    // The box ends where the next scope starts (children follow their parent's own lines).
    let end = rest[1..].find("data-scope=").map(|e| e + 1).unwrap_or(rest.len());
    &rest[..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scope_map_shows_every_scope_its_group_policy_and_live_rates_and_asks_for_a_token() {
    let gw = TestGateway::start().await;
    let base = format!("http://{}", gw.running.admin_addr.expect("an admin listener"));
    let url = format!("{base}/ui#token={}", gw.admin_token());

    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || render_with(&url, "data-scope=")
    })
    .await
    .unwrap();
    let routing = gw.running.gateway.routing();
    let scopes = routing.index().scopes();
    assert!(scopes.iter().any(|s| s.group == "main") && scopes.iter().any(|s| s.group == "events"));
    for scope in scopes {
        let digest = gw.running.gateway.registry().active(&scope.id).expect("a binding").module.digest().to_hex();
        let marker = format!("data-scope=\"{}\" data-group=\"{}\" data-policy=\"{digest}\"", scope.id, scope.group);
        assert!(dom.contains(&marker), "{marker} in:\n{dom}");
    }
    assert!(dom.contains("<form id=\"login\" hidden"), "no login prompt with a good token");

    // Writes raise the registry scope's write rate; an unsigned secret write is a deny.
    let mut client = gw.client().await;
    let mut attempts = 0;
    let registry = loop {
        for i in 0..20 {
            client.put(format!("/registry/pods/ns/p{attempts}-{i}"), "v", None).await.unwrap();
        }
        client.put("/registry/secrets/ns/s", "v", None).await.expect_err("an unsigned secret write is denied");
        let url = url.clone();
        let dom = tokio::task::spawn_blocking(move || render_with(&url, "data-scope=")).await.unwrap();
        let registry = scope_section(&dom, "registry").to_string();
        let rate: f64 = text_after(&registry, "data-rate=\"writes\"").and_then(|t| t.split(' ').next()?.parse().ok()).unwrap_or(0.0);
        if rate > 0.0 {
            let secrets = scope_section(&dom, "secrets").to_string();
            let denied = text_after(&secrets, "data-count=\"denied\"").unwrap_or_default().to_string();
            assert!(denied.split(' ').next().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n >= 1), "{denied}");
            // The deny itself, with the policy's reason, under recent denies.
            let denies = &dom[dom.find("id=\"denies\"").expect("a table of denies")..];
            assert!(denies.contains("/registry/secrets/ns/s") && denies.contains("need a verified credential"), "{denies}");
            break registry;
        }
        attempts += 1;
        assert!(attempts < 20, "the write rate never rose:\n{registry}");
    };
    assert!(registry.contains("writes/s"), "{registry}");

    // A picture for a person to look at.
    let picture = aq_tests::workspace_root().join("target").join("scope-map.png");
    tokio::task::spawn_blocking({
        let (url, picture) = (url.clone(), picture.clone());
        move || render(&url, Some(&picture))
    })
    .await
    .unwrap();
    assert!(std::fs::metadata(&picture).map(|m| m.len() > 10_000).unwrap_or(false), "a screenshot at {}", picture.display());

    // A wrong token: the login prompt, and no data.
    let wrong = format!("{base}/ui#token=aq_not_a_token");
    let dom = tokio::task::spawn_blocking(move || render_with(&wrong, "That token was refused.")).await.unwrap();
    assert!(dom.contains("That token was refused."), "{dom}");
    assert!(!dom.contains("data-scope="), "no scope is shown:\n{dom}");
    assert!(dom.contains("<main id=\"map\" hidden"), "{dom}");
}

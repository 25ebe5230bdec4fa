//! The scope layout, kept in the meta group: which scope owns which keys, on which group.
//!
//! The record at `\xffaq/meta/layout` is authoritative. Every replica routes by it and follows
//! it through its meta watch, so a change written by one replica (a move today; splits and
//! merges later) reaches every replica without a restart. Each change raises the record's
//! `epoch`; a replica never adopts an epoch older than the one it routes by.
//!
//! The configuration file only seeds the record. At start, a replica compares the file's scopes
//! with the record's `seed` (the digest of the scopes it was seeded from):
//!
//! - no record yet: the file's scopes become epoch 1;
//! - the same seed: the record wins, with whatever changed live since;
//! - another seed, and nothing changed live since the record was seeded: the operator edited
//!   the file, so its scopes become the next epoch;
//! - another seed after a live change: the record wins, and the replica warns that the file's
//!   scopes are ignored (re-seeding would drop the change and strand the keys it moved).

use serde::{Deserialize, Serialize};

use crate::index::{KeyRange, Scope, ScopeIndex};

/// The version of [`LayoutRecord`] this build writes and reads.
pub const LAYOUT_VERSION: u32 = 1;

/// The layout as stored (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutRecord {
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// Raised by one on every change.
    pub epoch: u64,
    /// blake3 (hex) of the configuration scopes this layout descends from.
    pub seed: String,
    /// Whether the scopes changed live (not from a configuration file) since the seed.
    pub changed_live: bool,
    /// Why this epoch exists, for people reading the record.
    pub reason: String,
    /// When this epoch was written (Unix seconds).
    pub changed_at: u64,
    /// Every scope, in key order.
    pub scopes: Vec<LayoutScope>,
}

/// One scope of a [`LayoutRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutScope {
    /// The scope's id.
    pub id: String,
    /// Its first key.
    pub start: KeyText,
    /// The first key after it; empty: to the end of the keyspace.
    pub end: KeyText,
    /// The group holding it.
    pub group: String,
    /// Operator labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Added to the group's revisions for clients; set when the scope moved
    /// ([`crate::index::RevisionShift`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision_offset: i64,
    /// The first revision clients can read at after a move; 0: all of them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision_floor: i64,
    /// The revision of the move's first write on the group; 0: the scope never moved.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision_base: i64,
    /// After a merge into the scope, the merged scope's old group's revision at its hand-off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision_handed: i64,
    /// The scope a split made it from ([`crate::index::Adapted`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_from: Option<String>,
    /// When a split, merge or move last changed it (Unix seconds).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub adapted_at: u64,
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// A key in a JSON record: its text when it is UTF-8, otherwise `{"hex": …}`, so that any key
/// survives the round trip and the usual ones stay readable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyText {
    /// A UTF-8 key.
    Text(String),
    /// Any other key, hex-encoded.
    Hex {
        /// The key's bytes, hex.
        hex: String,
    },
}

impl KeyText {
    /// The text form of `key`.
    pub fn of(key: &[u8]) -> Self {
        match std::str::from_utf8(key) {
            Ok(text) => KeyText::Text(text.to_string()),
            Err(_) => KeyText::Hex { hex: hex::encode(key) },
        }
    }

    /// The key's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        match self {
            KeyText::Text(text) => Ok(text.as_bytes().to_vec()),
            KeyText::Hex { hex } => hex::decode(hex).map_err(|e| format!("key {hex:?} is not hex: {e}")),
        }
    }
}

impl LayoutScope {
    fn of(scope: &Scope) -> Self {
        LayoutScope {
            id: scope.id.clone(),
            start: KeyText::of(&scope.range.start),
            end: KeyText::of(&scope.range.end),
            group: scope.group.clone(),
            labels: scope.labels.clone(),
            revision_offset: scope.revisions.offset,
            revision_floor: scope.revisions.floor,
            revision_base: scope.revisions.base,
            revision_handed: scope.revisions.handed,
            split_from: scope.adapted.split_from.clone(),
            adapted_at: scope.adapted.changed_at,
        }
    }

    fn to_scope(&self) -> Result<Scope, String> {
        let range = KeyRange { start: self.start.bytes()?, end: self.end.bytes()? };
        let (offset, floor, base, handed) = (self.revision_offset, self.revision_floor, self.revision_base, self.revision_handed);
        // A scope that never moved may still have a floor (a scope merged into it).
        let unmoved = offset == 0 && base == 0 && floor >= 0;
        // A group's first write has revision 2, so a move's first write maps no lower.
        if !(unmoved || (base - offset >= 2 && base <= floor)) || handed < 0 {
            return Err(format!(
                "scope {} has revision offset {offset}, base {base}, floor {floor} and handed {handed}: a moved scope needs base - offset >= 2 and base <= floor; restore the layout record aq wrote",
                self.id
            ));
        }
        let revisions = crate::index::RevisionShift { offset, floor, base, handed };
        let adapted = crate::index::Adapted { split_from: self.split_from.clone(), changed_at: self.adapted_at };
        Ok(Scope { id: self.id.clone(), range, group: self.group.clone(), labels: self.labels.clone(), revisions, adapted })
    }
}

/// What a replica does with the stored layout and its configuration's scopes at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// No layout is stored: write the configuration's as epoch 1.
    Seed(LayoutRecord),
    /// Route by the stored layout as it is.
    Keep,
    /// The configuration changed since it seeded the stored layout: write it as the next epoch.
    Reseed(LayoutRecord),
    /// The configuration changed, but so did the layout, live: keep the stored one and warn.
    KeepChangedLive,
}

impl LayoutRecord {
    /// The layout of `index`'s scopes, seeded from them, as epoch 1.
    pub fn seeded(index: &ScopeIndex) -> Self {
        LayoutRecord {
            version: LAYOUT_VERSION,
            epoch: 1,
            seed: seed_of(index),
            changed_live: false,
            reason: "seeded from the configuration".into(),
            changed_at: crate::clock::unix_now(),
            scopes: index.scopes().iter().map(|s| LayoutScope::of(s)).collect(),
        }
    }

    /// The next epoch after `self`, holding `index`'s scopes, changed live for `reason`.
    pub fn changed(&self, index: &ScopeIndex, reason: impl Into<String>) -> Self {
        LayoutRecord {
            version: LAYOUT_VERSION,
            epoch: self.epoch + 1,
            seed: self.seed.clone(),
            changed_live: true,
            reason: reason.into(),
            changed_at: crate::clock::unix_now(),
            scopes: index.scopes().iter().map(|s| LayoutScope::of(s)).collect(),
        }
    }

    /// What to do at start with `stored` (if any) and the configuration's `configured` scopes.
    pub fn adopt(stored: Option<&LayoutRecord>, configured: &ScopeIndex) -> Adoption {
        let Some(stored) = stored else { return Adoption::Seed(LayoutRecord::seeded(configured)) };
        if stored.seed == seed_of(configured) {
            Adoption::Keep
        } else if stored.changed_live {
            Adoption::KeepChangedLive
        } else {
            let mut next = LayoutRecord::seeded(configured);
            next.epoch = stored.epoch + 1;
            next.reason = "seeded again from a changed configuration".into();
            Adoption::Reseed(next)
        }
    }

    /// The scope index this layout describes.
    pub fn index(&self) -> Result<ScopeIndex, String> {
        if self.version != LAYOUT_VERSION {
            return Err(format!(
                "the stored layout is version {}, this aq reads version {LAYOUT_VERSION}; upgrade every replica to the same aq",
                self.version
            ));
        }
        let scopes = self.scopes.iter().map(LayoutScope::to_scope).collect::<Result<Vec<_>, _>>()?;
        ScopeIndex::new(scopes).map_err(|e| format!("the stored layout (epoch {}) is not a valid index: {e}", self.epoch))
    }
}

/// The digest naming a set of configured scopes, independent of their order in the file.
fn seed_of(index: &ScopeIndex) -> String {
    let scopes: Vec<LayoutScope> = index.scopes().iter().map(|s| LayoutScope::of(s)).collect();
    blake3::hash(&serde_json::to_vec(&scopes).expect("JSON")).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(scopes: &[(&str, &[u8], &str)]) -> ScopeIndex {
        ScopeIndex::new(
            scopes
                .iter()
                .map(|(id, prefix, group)| Scope {
                    id: id.to_string(),
                    range: KeyRange::prefix(prefix),
                    group: group.to_string(),
                    labels: Default::default(),
                    revisions: Default::default(),
                    adapted: Default::default(),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn any_key_survives_the_record_and_readable_ones_stay_text() {
        let configured = index(&[("all", b"", "main"), ("odd", b"/bin/\xff\x00", "main")]);
        let record = LayoutRecord::seeded(&configured);
        let json = serde_json::to_value(&record).unwrap();
        let odd = json["scopes"].as_array().unwrap().iter().find(|s| s["id"] == "odd").unwrap();
        assert_eq!(odd["start"]["hex"], "2f62696e2fff00");
        assert_eq!(json["scopes"][0]["start"], "");
        let back: LayoutRecord = serde_json::from_value(json).unwrap();
        let rebuilt = back.index().unwrap();
        assert_eq!(rebuilt.get("odd").unwrap().range, configured.get("odd").unwrap().range);
        assert_eq!(rebuilt.get("all").unwrap().range, configured.get("all").unwrap().range);
    }

    #[test]
    fn the_file_seeds_once_and_a_live_change_outlasts_it() {
        let file = index(&[("all", b"", "main"), ("registry", b"/registry/", "main")]);
        let Adoption::Seed(first) = LayoutRecord::adopt(None, &file) else { panic!("seeds") };
        assert_eq!(first.epoch, 1);
        // Written in another order, the same scopes are the same seed.
        let reordered = index(&[("registry", b"/registry/", "main"), ("all", b"", "main")]);
        assert_eq!(LayoutRecord::adopt(Some(&first), &reordered), Adoption::Keep);

        let edited = index(&[("all", b"", "main"), ("registry", b"/registry/", "events")]);
        let Adoption::Reseed(second) = LayoutRecord::adopt(Some(&first), &edited) else { panic!("reseeds") };
        assert_eq!((second.epoch, second.changed_live), (2, false));
        assert_eq!(second.index().unwrap().get("registry").unwrap().group, "events");

        let moved = second.changed(&file, "scope registry moved to main");
        assert_eq!((moved.epoch, moved.changed_live, moved.seed.clone()), (3, true, second.seed.clone()));
        // The file that seeded it still matches: the live change stands.
        assert_eq!(LayoutRecord::adopt(Some(&moved), &edited), Adoption::Keep);
        // Another file does not undo a live change.
        assert_eq!(LayoutRecord::adopt(Some(&moved), &file), Adoption::KeepChangedLive);
    }

    #[test]
    fn a_moved_scope_keeps_its_revision_shift_and_an_impossible_one_is_refused() {
        let unmoved = LayoutRecord::seeded(&index(&[("all", b"", "main")]));
        let json = serde_json::to_value(&unmoved).unwrap();
        assert!(json["scopes"][0].get("revision_offset").is_none(), "seeds stay as they were");
        let mut scopes = unmoved.index().unwrap().scopes().iter().map(|s| (**s).clone()).collect::<Vec<_>>();
        scopes[0].revisions = crate::index::RevisionShift { offset: 999, floor: 1003, base: 1001, handed: 0 };
        let moved = unmoved.changed(&ScopeIndex::new(scopes).unwrap(), "all moved");
        let back: LayoutRecord = serde_json::from_value(serde_json::to_value(&moved).unwrap()).unwrap();
        assert_eq!(back.index().unwrap().get("all").unwrap().revisions.offset, 999);
        let mut broken = back.clone();
        broken.scopes[0].revision_floor = 1000;
        let err = broken.index().unwrap_err();
        assert!(err.contains("scope all has revision offset 999, base 1001, floor 1000"), "{err}");
        // A scope that never moved but took a merged scope's keys has a floor of its own.
        let mut merged = back.clone();
        (merged.scopes[0].revision_offset, merged.scopes[0].revision_base) = (0, 0);
        (merged.scopes[0].revision_floor, merged.scopes[0].revision_handed) = (1500, 700);
        let shift = merged.index().unwrap().get("all").unwrap().revisions;
        assert_eq!((shift.floor, shift.handed, shift.is_identity()), (1500, 700, false));
    }

    #[test]
    fn a_record_of_another_version_or_an_invalid_index_is_refused_by_name() {
        let mut record = LayoutRecord::seeded(&index(&[("all", b"", "main")]));
        record.version = 9;
        assert!(record.index().unwrap_err().contains("version 9"));
        record.version = LAYOUT_VERSION;
        record.scopes.push(record.scopes[0].clone());
        assert!(record.index().unwrap_err().contains("epoch 1"));
    }
}

//! A well-formed component of a world that is not aq's: the engine must refuse it and say
//! what is missing.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        inline: "
            package other:greeter@1.0.0;
            interface greet { hello: func(name: string) -> string; }
            world greeter { export greet; }
        ",
    });

    struct Greeter;

    impl exports::other::greeter::greet::Guest for Greeter {
        fn hello(name: String) -> String {
            format!("hello {name}")
        }
    }

    export!(Greeter);
}

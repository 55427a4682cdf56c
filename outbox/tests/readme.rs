//! The README's end-to-end example is `examples/service.rs`, which CI builds and lints: the
//! README must show that file as it is, so the example a user copies compiles.

#[test]
fn readme_shows_the_compiled_service_example() {
    let readme = include_str!("../../README.md");
    let example = include_str!("../examples/service.rs");
    assert!(
        readme.contains(&format!("```rust\n{example}```\n")),
        "README.md's \"Use it in your service\" example differs from outbox/examples/service.rs: \
         copy the file into the README"
    );
}

//! Publishes the absolute path of `link.ld` to the build scripts of the
//! crates that depend on guest-rt: Cargo hands it to them as the environment
//! variable `DEP_GUEST_RT_LINKER_SCRIPT` (see the `links` key in Cargo.toml).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let script = std::path::Path::new(&dir).join("link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:linker-script={}", script.display());
}

// The build script of every test guest (probe, bench, fuzz), which each
// `include!`s: links the guest as a multiboot1 kernel at 1 MiB with
// guest-rt's linker script (its path comes from guest-rt's build script,
// via `links`).

fn main() {
    let script = std::env::var("DEP_GUEST_RT_LINKER_SCRIPT")
        .expect("guest-rt's build script publishes DEP_GUEST_RT_LINKER_SCRIPT");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../rt/guest_build.rs");
    // Only the bare-metal build is a guest; a host build (e.g. a workspace
    // `cargo test`) compiles an empty stub and links normally.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{script}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=0x1000");
    }
}

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
        // No GNU_RELRO segment: the bootloader would make .data (which
        // holds .got) read-only.
        println!("cargo:rustc-link-arg-bins=-znorelro");
    }
    println!("cargo:rerun-if-changed=linker.ld");
}

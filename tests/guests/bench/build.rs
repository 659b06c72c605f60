//! Links the bench guest as a multiboot1 kernel at 1 MiB with guest-rt's linker
//! script: the build script all test guests share.

include!("../rt/guest_build.rs");

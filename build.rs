//! Says whether the JPEG codec has its SIMD code, loudly when it has not.
//!
//! mozjpeg-sys builds libjpeg with the `cc` crate and adds its x86 SIMD
//! (NASM assembly) only when `nasm -v` could be run at build time; it
//! notes a missing nasm only in a warning Cargo hides for registry crates.
//! It writes `#define WITH_SIMD 1` into the `jconfig.h` it generates, in the
//! first directory of `DEP_JPEG_INCLUDE` (its `links = "jpeg"` metadata).
//! We read that, tell the crate (`KLING_JPEG_SIMD`, shown at start-up and
//! on the `kling_archiver_build_info` metric) and warn here; with
//! `KLING_REQUIRE_JPEG_SIMD=1` (the Dockerfile, the benchmark) a build
//! without SIMD fails instead.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_JPEG_INCLUDE");
    let simd = match jconfig() {
        Some((path, text)) => {
            println!("cargo:rerun-if-changed={}", path.display());
            text.lines()
                .any(|l| l.split_whitespace().eq(["#define", "WITH_SIMD", "1"]))
        }
        None => {
            println!(
                "cargo:warning=cannot find mozjpeg-sys's jconfig.h (DEP_JPEG_INCLUDE); assuming no SIMD"
            );
            false
        }
    };
    println!("cargo:rustc-env=KLING_JPEG_SIMD={simd}");
    // Production builds (the Dockerfile, the benchmark) insist.
    println!("cargo:rerun-if-env-changed=KLING_REQUIRE_JPEG_SIMD");
    let required = std::env::var("KLING_REQUIRE_JPEG_SIMD").is_ok_and(|v| v == "1" || v == "true");
    if required && !simd {
        panic!(
            "KLING_REQUIRE_JPEG_SIMD is set but libjpeg was built without SIMD: install nasm, \
             then `cargo clean -p mozjpeg-sys` and build again"
        );
    }
    let x86 = matches!(
        std::env::var("CARGO_CFG_TARGET_ARCH").as_deref(),
        Ok("x86_64" | "x86")
    );
    if !simd {
        let fix = if x86 {
            "install nasm (apt-get install nasm, brew install nasm) and rebuild (cargo clean -p mozjpeg-sys)"
        } else {
            "this target has no SIMD build in mozjpeg-sys"
        };
        println!(
            "cargo:warning=JPEG SIMD is OFF: libjpeg was built without its SIMD code, so \
             preparing JPEGs takes 1.5x (decode) to 5x (encode) as long. Fine for the demo; \
             for production {fix}."
        );
    }
}

/// The `jconfig.h` mozjpeg-sys generated, and its text.
fn jconfig() -> Option<(PathBuf, String)> {
    let include = std::env::var_os("DEP_JPEG_INCLUDE")?;
    std::env::split_paths(&include)
        .map(|dir| dir.join("jconfig.h"))
        .find_map(|path| Some((path.clone(), std::fs::read_to_string(&path).ok()?)))
}

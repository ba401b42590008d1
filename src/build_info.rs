//! Facts fixed when this binary was built: its version, and whether the
//! JPEG codec has its SIMD code (`build.rs` reads that from mozjpeg-sys).
//! A build without SIMD works but prepares JPEGs several times slower, so
//! it says so at build time (a Cargo warning), at start-up (one warning
//! line, [`warn_if_slow`]) and on the `kling_archiver_build_info` metric.
//! A leaf: it knows nothing of the rest of the crate.

/// The crate version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether libjpeg was built with its SIMD code (`nasm` was found when
/// mozjpeg-sys was built). Without it, decoding a JPEG takes about 1.5x
/// and encoding one 4-5x as long (docs/benchmarks.md).
pub const JPEG_SIMD: bool = matches!(env!("KLING_JPEG_SIMD").as_bytes(), b"true");

/// The line a build without SIMD prints at start-up.
pub const NO_SIMD: &str = "JPEG SIMD is off: this build's libjpeg has no SIMD code (nasm was \
     not found when it was built), so preparing JPEGs is several times slower. Fine for \
     the demo; for production install nasm and rebuild (cargo clean -p mozjpeg-sys)";

/// Log [`NO_SIMD`] once, at warning level, when [`JPEG_SIMD`] is false.
pub fn warn_if_slow() {
    if !JPEG_SIMD {
        tracing::warn!(jpeg_simd = false, "{NO_SIMD}");
    }
}

//! The raw libjpeg API of mozjpeg (the `mozjpeg-sys` crate, built from its
//! bundled C source by the `cc` crate, with NASM SIMD when `nasm` was found
//! at build time), wrapped so that nothing unsafe leaves this file. Part of
//! `prepare`; `jpeg.rs` is the codec the rest of the crate sees.
//!
//! **Errors never longjmp.** libjpeg reports a fatal error by calling
//! `error_exit`, which must not return. mozjpeg-sys compiles the C code with
//! `-fexceptions` (its `unwinding` feature) and declares every callback
//! `extern "C-unwind"`, so our `error_exit` unwinds (`resume_unwind`, which
//! skips the panic hook: a bad JPEG prints nothing) with a [`Failure`]
//! payload, and [`guard`] catches it at the boundary. Warnings (corrupt
//! data, premature end of data, extraneous bytes) fail the same way: the
//! caller then gives the more forgiving `image` decoder its chance. After
//! any outcome the handle is put back to its start state with
//! `jpeg_abort_*`, so a thread's handle is reused by its next job.
//!
//! **The encoder is configured for speed**, as libjpeg-turbo and libvips
//! encode: mozjpeg's `JCP_FASTEST` profile (baseline, no trellis
//! quantisation, no progressive scans, no scan optimisation), standard
//! Huffman tables, the standard (Annex K) quantisation tables, the accurate
//! integer DCT.

use std::ffi::CStr;
use std::os::raw::{c_int, c_ulong};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use mozjpeg_sys as sys;

/// Progressive scans allowed before a decode is refused: a hostile
/// progressive JPEG with thousands of tiny scans costs CPU far beyond its
/// size. Encoders write about 10; libjpeg-turbo's own tools suggest 500.
pub(super) const MAX_SCANS: c_int = 500;

/// What libjpeg found wrong, in its own words (or ours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The unwind payload of a libjpeg error.
struct Failure(String);

fn fail(message: String) -> ! {
    resume_unwind(Box::new(Failure(message)))
}

/// Run `f`, turning a libjpeg error (a [`Failure`] unwinding out of the C
/// code) into an [`Error`]. Any other panic is a bug and goes on unwinding.
fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<Failure>() {
            Ok(failure) => Err(Error(failure.0)),
            Err(other) => resume_unwind(other),
        },
    }
}

/// libjpeg's message for its last error or warning.
///
/// # Safety
/// `cinfo.err` points at a `jpeg_error_mgr` set up by `jpeg_std_error`.
unsafe fn message(cinfo: &mut sys::jpeg_common_struct) -> String {
    // JMSG_LENGTH_MAX is 200; the binding types the buffer as 80 bytes.
    let mut buf = [0u8; 200];
    // SAFETY: `err` is ours (see `new_error_mgr`); format_message writes a
    // NUL-terminated string of at most JMSG_LENGTH_MAX bytes into `buf`.
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            format(cinfo, &*(buf.as_mut_ptr() as *const [u8; 80]));
        }
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "libjpeg error".to_owned())
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut sys::jpeg_common_struct) {
    // SAFETY: called by libjpeg with its handle, whose `err` is ours.
    fail(unsafe { message(cinfo) })
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut sys::jpeg_common_struct, level: c_int) {
    // -1 is a warning (corrupt or truncated data); >= 0 are traces.
    if level < 0 {
        // SAFETY: as in `error_exit`.
        fail(unsafe { message(cinfo) })
    }
}

unsafe extern "C-unwind" fn output_message(_: &mut sys::jpeg_common_struct) {}

/// Refuses a stream once it has more than [`MAX_SCANS`] scans. libjpeg
/// calls it while absorbing a multi-scan file and once per output pass.
unsafe extern "C-unwind" fn scan_limit(cinfo: &mut sys::jpeg_common_struct) {
    if cinfo.is_decompressor != 0 {
        // SAFETY: a decompressor's common struct is the first field of its
        // `jpeg_decompress_struct` (both `repr(C)`).
        let d = unsafe {
            &*(cinfo as *const sys::jpeg_common_struct).cast::<sys::jpeg_decompress_struct>()
        };
        if d.input_scan_number > MAX_SCANS {
            fail(format!("more than {MAX_SCANS} scans: refused"));
        }
    }
}

fn new_error_mgr() -> Box<sys::jpeg_error_mgr> {
    // SAFETY: a zeroed error manager is what jpeg_std_error fills in.
    let mut err: Box<sys::jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
    // SAFETY: `err` is a valid, exclusively borrowed error manager.
    unsafe { sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err.output_message = Some(output_message);
    err
}

/// The header facts a caller decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub width: usize,
    pub height: usize,
    /// YCbCr with three components, luma sampled `(h, v)` times the chroma,
    /// both chroma components 1x1: the layouts [`Decoder::planes`] reads.
    pub ycbcr_sampling: Option<(usize, usize)>,
}

/// Decoded YCbCr planes, each `stride` bytes a row, padded right and
/// below to whole MCUs; `luma` is `width x height` of it, each chroma plane
/// `ceil(width / h) x ceil(height / v)` for sampling `(h, v)`.
pub(super) struct RawPlanes {
    pub luma: (Vec<u8>, usize),
    pub cb: (Vec<u8>, usize),
    pub cr: (Vec<u8>, usize),
    pub sampling: (usize, usize),
}

/// A libjpeg decompressor. Boxed parts: libjpeg holds pointers to them.
pub(super) struct Decoder {
    cinfo: Box<sys::jpeg_decompress_struct>,
    _err: Box<sys::jpeg_error_mgr>,
    _progress: Box<sys::jpeg_progress_mgr>,
}

impl Decoder {
    pub fn new() -> Result<Self, Error> {
        let mut err = new_error_mgr();
        // SAFETY: zeroed is the documented starting state before create.
        let mut cinfo: Box<sys::jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
        let mut progress: Box<sys::jpeg_progress_mgr> = Box::new(unsafe { std::mem::zeroed() });
        progress.progress_monitor = Some(scan_limit);
        cinfo.common.err = &mut *err;
        // SAFETY: `cinfo` has its error manager; errors unwind into guard.
        guard(|| {
            unsafe { sys::jpeg_create_decompress(&mut *cinfo) };
            Ok(())
        })?;
        cinfo.common.progress = &mut *progress;
        Ok(Self {
            cinfo,
            _err: err,
            _progress: progress,
        })
    }

    /// Read `data`'s header, refuse it unless the frame is `dims`, then run
    /// `body`; the handle is back at its start state afterwards, whatever
    /// happened.
    fn session<T>(
        &mut self,
        data: &[u8],
        dims: [u32; 2],
        body: impl FnOnce(&mut sys::jpeg_decompress_struct, Header) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let cinfo = &mut *self.cinfo;
        let result = guard(|| {
            // SAFETY: `data` outlives the session; the handle is created.
            unsafe {
                sys::jpeg_mem_src(cinfo, data.as_ptr(), data.len() as c_ulong);
                sys::jpeg_read_header(cinfo, 1);
            }
            let header = header(cinfo);
            let [w, h] = dims.map(|v| v as usize);
            if (header.width, header.height) != (w, h) {
                return Err(Error(format!(
                    "frame is {}x{}, the header check saw {w}x{h}",
                    header.width, header.height
                )));
            }
            body(cinfo, header)
        });
        // SAFETY: abort is valid in every state of a created handle.
        let _ = guard(|| {
            unsafe { sys::jpeg_abort_decompress(cinfo) };
            Ok(())
        });
        result
    }

    /// Decode to packed RGB, `width * 3` bytes a row.
    pub fn rgb(&mut self, data: &[u8], dims: [u32; 2]) -> Result<Vec<u8>, Error> {
        self.session(data, dims, |cinfo, header| {
            cinfo.out_color_space = sys::J_COLOR_SPACE::JCS_RGB;
            // SAFETY: after jpeg_read_header, as libjpeg.txt orders it.
            unsafe { sys::jpeg_start_decompress(cinfo) };
            if cinfo.output_components != 3 {
                return Err(Error("not decodable to RGB".into()));
            }
            let stride = header.width * 3;
            let mut pixels = vec![0u8; stride * header.height];
            let mut rows: Vec<*mut u8> = pixels
                .chunks_exact_mut(stride)
                .map(<[u8]>::as_mut_ptr)
                .collect();
            while (cinfo.output_scanline as usize) < header.height {
                let done = cinfo.output_scanline as usize;
                let left = (header.height - done) as u32;
                // SAFETY: each row pointer addresses `stride` writable bytes.
                let n = unsafe { sys::jpeg_read_scanlines(cinfo, rows[done..].as_mut_ptr(), left) };
                if n == 0 {
                    return Err(Error("the decoder made no progress".into()));
                }
            }
            // SAFETY: all scanlines were read.
            unsafe { sys::jpeg_finish_decompress(cinfo) };
            Ok(pixels)
        })
    }

    /// Decode a YCbCr stream to its own planes, without colour conversion
    /// or chroma upsampling; `Ok(None)` when it is not one of the layouts
    /// [`Header::ycbcr_sampling`] names.
    pub fn planes(&mut self, data: &[u8], dims: [u32; 2]) -> Result<Option<RawPlanes>, Error> {
        self.session(data, dims, |cinfo, header| {
            let Some((sh, sv)) = header.ycbcr_sampling else {
                return Ok(None);
            };
            cinfo.raw_data_out = 1;
            // SAFETY: after jpeg_read_header.
            unsafe { sys::jpeg_start_decompress(cinfo) };
            let mcu_cols = header.width.div_ceil(8 * sh);
            let mcu_rows = header.height.div_ceil(8 * sv);
            let plane = |h: usize, v: usize| {
                let stride = mcu_cols * 8 * h;
                (vec![0u8; stride * mcu_rows * 8 * v], stride)
            };
            let (mut luma, mut cb, mut cr) = (plane(sh, sv), plane(1, 1), plane(1, 1));
            for row in 0..mcu_rows {
                if cinfo.output_scanline as usize >= header.height {
                    break;
                }
                let rows = |p: &mut (Vec<u8>, usize), v: usize| -> Vec<*mut u8> {
                    let (buf, stride) = (&mut p.0, p.1);
                    buf[row * 8 * v * stride..][..8 * v * stride]
                        .chunks_exact_mut(stride)
                        .map(<[u8]>::as_mut_ptr)
                        .collect()
                };
                let mut y_rows = rows(&mut luma, sv);
                let mut cb_rows = rows(&mut cb, 1);
                let mut cr_rows = rows(&mut cr, 1);
                let mut image = [
                    y_rows.as_mut_ptr(),
                    cb_rows.as_mut_ptr(),
                    cr_rows.as_mut_ptr(),
                ];
                // SAFETY: one iMCU row: 8*v rows of each component, each
                // row an MCU-aligned stride of writable bytes.
                let n =
                    unsafe { sys::jpeg_read_raw_data(cinfo, image.as_mut_ptr(), (8 * sv) as u32) };
                if n == 0 {
                    return Err(Error("the decoder made no progress".into()));
                }
            }
            // SAFETY: every iMCU row was read.
            unsafe { sys::jpeg_finish_decompress(cinfo) };
            Ok(Some(RawPlanes {
                luma,
                cb,
                cr,
                sampling: (sh, sv),
            }))
        })
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new`; destroy frees all of
        // libjpeg's memory for it (a blocking-pool thread that exits takes
        // its handle with it).
        let cinfo = &mut *self.cinfo;
        let _ = guard(|| {
            unsafe { sys::jpeg_destroy_decompress(cinfo) };
            Ok(())
        });
    }
}

fn header(cinfo: &sys::jpeg_decompress_struct) -> Header {
    let mut ycbcr_sampling = None;
    if cinfo.jpeg_color_space == sys::J_COLOR_SPACE::JCS_YCbCr && cinfo.num_components == 3 {
        // SAFETY: after jpeg_read_header, comp_info holds num_components entries.
        let comps = unsafe { std::slice::from_raw_parts(cinfo.comp_info, 3) };
        let factor = |i: usize| (comps[i].h_samp_factor, comps[i].v_samp_factor);
        if factor(1) == (1, 1)
            && factor(2) == (1, 1)
            && matches!(factor(0), (1, 1) | (2, 1) | (1, 2) | (2, 2))
        {
            let (h, v) = factor(0);
            ycbcr_sampling = Some((h as usize, v as usize));
        }
    }
    Header {
        width: cinfo.image_width as usize,
        height: cinfo.image_height as usize,
        ycbcr_sampling,
    }
}

/// Where the encoder writes: a `Vec` grown as libjpeg asks for room.
#[repr(C)]
struct VecDest {
    mgr: sys::jpeg_destination_mgr,
    buf: Vec<u8>,
}

impl VecDest {
    /// Point libjpeg at the spare capacity after `buf`'s contents.
    fn point(&mut self) {
        let len = self.buf.len();
        // SAFETY: `len <= capacity`, so the pointer stays in the allocation.
        self.mgr.next_output_byte = unsafe { self.buf.as_mut_ptr().add(len) };
        self.mgr.free_in_buffer = self.buf.capacity() - len;
    }

    /// # Safety
    /// `cinfo.dest` is the `mgr` of a live `VecDest` (see [`Encoder`]).
    unsafe fn of(cinfo: &mut sys::jpeg_compress_struct) -> &mut VecDest {
        unsafe { &mut *cinfo.dest.cast::<VecDest>() }
    }
}

unsafe extern "C-unwind" fn init_destination(cinfo: &mut sys::jpeg_compress_struct) {
    // SAFETY: the encoder set `dest` to its VecDest.
    let d = unsafe { VecDest::of(cinfo) };
    d.buf.clear();
    d.point();
}

unsafe extern "C-unwind" fn empty_output_buffer(
    cinfo: &mut sys::jpeg_compress_struct,
) -> sys::boolean {
    // SAFETY: as above. libjpeg calls this when the whole buffer is full,
    // so all of the capacity holds written bytes.
    let d = unsafe { VecDest::of(cinfo) };
    unsafe { d.buf.set_len(d.buf.capacity()) };
    d.buf.reserve(d.buf.len().max(1 << 16));
    d.point();
    1
}

unsafe extern "C-unwind" fn term_destination(cinfo: &mut sys::jpeg_compress_struct) {
    // SAFETY: as above; the bytes before `next_output_byte` are written.
    let d = unsafe { VecDest::of(cinfo) };
    let used = d.buf.capacity() - d.mgr.free_in_buffer;
    unsafe { d.buf.set_len(used) };
}

/// What [`Encoder::encode`] is given.
pub(super) enum Input<'a> {
    /// Packed RGB, `width * 3` bytes a row, encoded with luma sampled
    /// `sampling` times the chroma.
    Rgb {
        pixels: &'a [u8],
        sampling: (u8, u8),
    },
    /// 4:2:0 planes: luma `width x height`, chroma half of each, rounded up.
    Planes420 {
        y: &'a [u8],
        cb: &'a [u8],
        cr: &'a [u8],
    },
}

/// A libjpeg compressor writing into a `Vec`.
pub(super) struct Encoder {
    cinfo: Box<sys::jpeg_compress_struct>,
    _err: Box<sys::jpeg_error_mgr>,
    dest: Box<VecDest>,
}

impl Encoder {
    pub fn new() -> Result<Self, Error> {
        let mut err = new_error_mgr();
        // SAFETY: zeroed is the documented starting state before create.
        let mut cinfo: Box<sys::jpeg_compress_struct> = Box::new(unsafe { std::mem::zeroed() });
        cinfo.common.err = &mut *err;
        guard(|| {
            // SAFETY: `cinfo` has its error manager.
            unsafe { sys::jpeg_create_compress(&mut *cinfo) };
            Ok(())
        })?;
        let mut dest = Box::new(VecDest {
            // SAFETY: all-null pointers and `None` callbacks, filled below.
            mgr: unsafe { std::mem::zeroed() },
            buf: Vec::new(),
        });
        dest.mgr.init_destination = Some(init_destination);
        dest.mgr.empty_output_buffer = Some(empty_output_buffer);
        dest.mgr.term_destination = Some(term_destination);
        cinfo.dest = &mut dest.mgr;
        Ok(Self {
            cinfo,
            _err: err,
            dest,
        })
    }

    /// Encode a `width x height` image at `quality` as a baseline JPEG.
    pub fn encode(
        &mut self,
        input: Input<'_>,
        width: usize,
        height: usize,
        quality: u8,
    ) -> Result<Vec<u8>, Error> {
        let need = |planes: &[(&[u8], usize)]| planes.iter().all(|(p, len)| p.len() >= *len);
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        let sized = match &input {
            Input::Rgb { pixels, .. } => need(&[(pixels, width * height * 3)]),
            Input::Planes420 { y, cb, cr } => {
                need(&[(y, width * height), (cb, cw * ch), (cr, cw * ch)])
            }
        };
        if !sized || width == 0 || height == 0 {
            return Err(Error(format!("no {width}x{height} image to encode")));
        }
        self.dest.buf.reserve((width * height / 4).max(1 << 16));
        let cinfo = &mut *self.cinfo;
        let result = guard(|| {
            // SAFETY: the handle is created, `dest` is our VecDest, and the
            // input holds the bytes checked above.
            unsafe {
                setup(cinfo, &input, width, height, quality);
                sys::jpeg_start_compress(cinfo, 1);
                match input {
                    Input::Rgb { pixels, .. } => write_rgb(cinfo, pixels, width * 3, height),
                    Input::Planes420 { y, cb, cr } => {
                        write_planes(cinfo, [(y, width, height), (cb, cw, ch), (cr, cw, ch)])
                    }
                }
                sys::jpeg_finish_compress(cinfo);
            }
            Ok(())
        });
        let _ = guard(|| {
            // SAFETY: abort is valid in every state of a created handle.
            unsafe { sys::jpeg_abort_compress(cinfo) };
            Ok(())
        });
        result.map(|()| std::mem::take(&mut self.dest.buf))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: as for the decoder.
        let cinfo = &mut *self.cinfo;
        let _ = guard(|| {
            unsafe { sys::jpeg_destroy_compress(cinfo) };
            Ok(())
        });
    }
}

/// Parameters: speed first, as libjpeg-turbo's defaults (module docs).
///
/// # Safety
/// `cinfo` is a created compressor.
unsafe fn setup(
    cinfo: &mut sys::jpeg_compress_struct,
    input: &Input<'_>,
    w: usize,
    h: usize,
    q: u8,
) {
    cinfo.image_width = w as u32;
    cinfo.image_height = h as u32;
    cinfo.input_components = 3;
    cinfo.in_color_space = match input {
        Input::Rgb { .. } => sys::J_COLOR_SPACE::JCS_RGB,
        Input::Planes420 { .. } => sys::J_COLOR_SPACE::JCS_YCbCr,
    };
    unsafe {
        sys::jpeg_c_set_int_param(cinfo, sys::JINT_COMPRESS_PROFILE, sys::JCP_FASTEST as c_int);
        sys::jpeg_set_defaults(cinfo);
        sys::jpeg_set_colorspace(cinfo, sys::J_COLOR_SPACE::JCS_YCbCr);
        sys::jpeg_set_quality(cinfo, c_int::from(q), 1);
    }
    cinfo.optimize_coding = 0;
    cinfo.dct_method = sys::J_DCT_METHOD::JDCT_ISLOW;
    let (sh, sv) = match input {
        Input::Rgb { sampling, .. } => *sampling,
        Input::Planes420 { .. } => (2, 2),
    };
    cinfo.raw_data_in = c_int::from(matches!(input, Input::Planes420 { .. }));
    // SAFETY: jpeg_set_colorspace(YCbCr) made three components.
    let comps = unsafe { std::slice::from_raw_parts_mut(cinfo.comp_info, 3) };
    for (i, c) in comps.iter_mut().enumerate() {
        let (h, v) = if i == 0 { (sh, sv) } else { (1, 1) };
        c.h_samp_factor = c_int::from(h);
        c.v_samp_factor = c_int::from(v);
    }
}

/// # Safety
/// `cinfo` has started compressing `pixels`, `height` rows of `stride` bytes.
unsafe fn write_rgb(
    cinfo: &mut sys::jpeg_compress_struct,
    pixels: &[u8],
    stride: usize,
    height: usize,
) {
    let rows: Vec<*const u8> = pixels
        .chunks_exact(stride)
        .take(height)
        .map(<[u8]>::as_ptr)
        .collect();
    while (cinfo.next_scanline as usize) < height {
        let done = cinfo.next_scanline as usize;
        // SAFETY: each pointer addresses one full row.
        let n = unsafe {
            sys::jpeg_write_scanlines(cinfo, rows[done..].as_ptr(), (height - done) as u32)
        };
        if n == 0 {
            fail("the encoder made no progress".into());
        }
    }
}

/// Write 4:2:0 planes (each `(bytes, width, height)`) one iMCU row (16
/// luma rows) at a time. libjpeg reads whole 8x8 blocks, so a plane whose
/// width is not a multiple of 8 has its rows copied with the last column
/// repeated, and rows below the last are the last row again: edge
/// replication, as libjpeg-turbo pads.
///
/// # Safety
/// `cinfo` has started compressing raw 4:2:0 data of these planes.
unsafe fn write_planes(cinfo: &mut sys::jpeg_compress_struct, planes: [(&[u8], usize, usize); 3]) {
    let luma_height = planes[0].2;
    let mut scratch: Vec<Vec<u8>> = planes
        .iter()
        .enumerate()
        .map(|(i, &(_, w, _))| vec![0u8; w.next_multiple_of(8) * if i == 0 { 16 } else { 8 }])
        .collect();
    let mut row = 0;
    while (cinfo.next_scanline as usize) < luma_height {
        let mut pointers: Vec<Vec<*const u8>> = Vec::with_capacity(3);
        for (i, (&(data, w, h), scratch)) in planes.iter().zip(&mut scratch).enumerate() {
            let lines = if i == 0 { 16 } else { 8 };
            let padded = w.next_multiple_of(8);
            let ptrs = (0..lines)
                .map(|k| {
                    let src = &data[(row * lines + k).min(h - 1) * w..][..w];
                    if padded == w {
                        return src.as_ptr();
                    }
                    let dst = &mut scratch[k * padded..][..padded];
                    dst[..w].copy_from_slice(src);
                    dst[w..].fill(src[w - 1]);
                    dst.as_ptr()
                })
                .collect();
            pointers.push(ptrs);
        }
        let image = [
            pointers[0].as_ptr(),
            pointers[1].as_ptr(),
            pointers[2].as_ptr(),
        ];
        // SAFETY: 16 luma and 8 chroma row pointers, each a padded row.
        let n = unsafe { sys::jpeg_write_raw_data(cinfo, image.as_ptr(), 16) };
        if n == 0 {
            fail("the encoder made no progress".into());
        }
        row += 1;
    }
}

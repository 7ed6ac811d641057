//! Layer compression: OCI and Docker media types, detection by magic bytes, streaming
//! decompression, and a multi-threaded encoder whose output depends on the input bytes only.
//!
//! Layer digests must not depend on the machine that built them, so the [`Encoder`] is
//! deterministic whatever the number of threads:
//! - gzip goes through gzp's pigz-like `ParCompress`: the input is cut into fixed 1 MiB chunks
//!   compressed independently (sync flush between chunks), written in order as one gzip member
//!   with no file name and mtime 0. Chunk boundaries depend on byte offsets only, never on the
//!   thread count or on how the caller splits its writes.
//! - zstd uses libzstd's multi-threaded mode with at least one worker: its jobs are cut by
//!   size from the compression parameters, so the frame is the same for any worker count ≥ 1
//!   (zstd's single-threaded mode, 0 workers, produces a different frame and is never used).
//!
//! [`Encoder`]'s `flush` does not force a block boundary (that would make the output depend
//! on when the caller flushes); [`Encoder::finish`] ends the stream.

use std::fmt;
use std::io::{self, BufRead, Cursor, Read, Write};
use std::num::NonZero;
use std::str::FromStr;

use flate2::bufread::MultiGzDecoder;
use gzp::ZWriter as _;
use gzp::deflate::Gzip;
use gzp::par::compress::{ParCompress, ParCompressBuilder};

/// Docker's default gzip level (Go's `gzip.DefaultCompression`).
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// zstd's default level, which BuildKit and containerd use too.
pub const DEFAULT_ZSTD_LEVEL: u32 = 3;
/// The input each gzip chunk covers. pigz uses 128 KiB with the previous chunk's last 32 KiB
/// as a dictionary; gzp with a pure-Rust deflate has no dictionary, and 1 MiB chunks keep the
/// cost of that under 0.2% of the compressed size (measured on a tar of `/usr`).
const GZIP_CHUNK_SIZE: usize = 1 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (RFC 1952), what Docker and most registries expect.
    #[default]
    Gzip,
    /// zstd (RFC 8878).
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::None => "application/vnd.oci.image.layer.v1.tar",
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// The compression a layer media type names: OCI's (including the deprecated
    /// non-distributable ones) and Docker's schema 2 ones (including foreign layers); `None`
    /// for a media type that is not a layer.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            // containerd's name for zstd layers in Docker manifests.
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The compression of a stream starting with `prefix`, by its magic bytes; anything else
    /// (including a prefix too short to tell) is taken as uncompressed.
    pub fn detect(prefix: &[u8]) -> Self {
        if prefix.starts_with(&GZIP_MAGIC) {
            Self::Gzip
        } else if prefix.starts_with(&ZSTD_MAGIC) {
            Self::Zstd
        } else {
            Self::None
        }
    }

    /// The level used when none is given.
    pub fn default_level(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Gzip => DEFAULT_GZIP_LEVEL,
            Self::Zstd => DEFAULT_ZSTD_LEVEL,
        }
    }

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "uncompressed",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A compression name that is not `uncompressed`, `gzip` or `zstd`.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {name:?}: want uncompressed, gzip or zstd")]
pub struct UnknownCompression {
    /// The rejected name.
    pub name: String,
}

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "uncompressed" | "none" => Ok(Self::None),
            "gzip" => Ok(Self::Gzip),
            "zstd" => Ok(Self::Zstd),
            _ => Err(UnknownCompression {
                name: name.to_string(),
            }),
        }
    }
}

/// Wraps `reader` in a decoder for the compression its first bytes show: gzip (every member
/// of a multi-member stream, as pigz and `cat a.gz b.gz` make), zstd (every frame), or none.
pub fn decompress<'a>(mut reader: impl BufRead + 'a) -> io::Result<Box<dyn Read + 'a>> {
    // A BufRead may hand out fewer bytes than a magic number at a time: gather them, then put
    // them back in front of the rest.
    let mut prefix = Vec::with_capacity(ZSTD_MAGIC.len());
    while prefix.len() < ZSTD_MAGIC.len() {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            break;
        }
        let taken = available.len().min(ZSTD_MAGIC.len() - prefix.len());
        prefix.extend_from_slice(&available[..taken]);
        reader.consume(taken);
    }
    let compression = Compression::detect(&prefix);
    let stream = Cursor::new(prefix).chain(reader);
    Ok(match compression {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(MultiGzDecoder::new(stream)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(stream)?),
    })
}

/// How an [`Encoder`] compresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderOptions {
    /// gzip 0–9, zstd 1–22; `None` for [`Compression::default_level`]. Ignored when not
    /// compressing.
    pub level: Option<u32>,
    /// Compression threads; `None` for every available core. The output does not depend on it.
    pub threads: Option<NonZero<usize>>,
}

/// A streaming compressor writing into `W`; [`Encoder::finish`] must be called to end the
/// stream and get `W` back.
pub struct Encoder<W: Write + Send + 'static> {
    state: State<W>,
}

enum State<W: Write + Send + 'static> {
    None(W),
    Gzip(ParallelGzip<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write + Send + 'static> Encoder<W> {
    /// Starts a stream at the default level on every available core.
    pub fn new(inner: W, compression: Compression) -> io::Result<Self> {
        Self::with_options(inner, compression, EncoderOptions::default())
    }

    /// Starts a stream with a chosen level and thread count.
    pub fn with_options(
        inner: W,
        compression: Compression,
        options: EncoderOptions,
    ) -> io::Result<Self> {
        let level = options.level.unwrap_or(compression.default_level());
        let threads = options.threads.map_or_else(available_threads, NonZero::get);
        let state = match compression {
            Compression::None => State::None(inner),
            Compression::Gzip => {
                if level > 9 {
                    return Err(invalid_level(compression, level, "0-9"));
                }
                let compressor = ParCompressBuilder::<Gzip>::new()
                    .buffer_size(GZIP_CHUNK_SIZE)
                    .and_then(|builder| builder.num_threads(threads))
                    .map_err(io::Error::other)?
                    .compression_level(flate2::Compression::new(level))
                    .from_writer(inner);
                State::Gzip(ParallelGzip {
                    compressor: Some(compressor),
                })
            }
            Compression::Zstd => {
                let range = zstd::compression_level_range();
                let signed = i32::try_from(level).unwrap_or(i32::MAX);
                if level == 0 || !range.contains(&signed) {
                    return Err(invalid_level(compression, level, "1-22"));
                }
                let mut encoder = zstd::stream::write::Encoder::new(inner, signed)?;
                encoder.multithread(u32::try_from(threads).unwrap_or(u32::MAX))?;
                State::Zstd(encoder)
            }
        };
        Ok(Self { state })
    }

    /// Compresses what is buffered, ends the stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self.state {
            State::None(inner) => Ok(inner),
            State::Gzip(gzip) => gzip.finish(),
            State::Zstd(encoder) => encoder.finish(),
        }
    }
}

impl<W: Write + Send + 'static> Write for Encoder<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match &mut self.state {
            State::None(inner) => inner.write(buffer),
            State::Gzip(gzip) => gzip.write(buffer),
            State::Zstd(encoder) => encoder.write(buffer),
        }
    }

    /// Flushes an uncompressed stream; does nothing for a compressed one, whose bytes must not
    /// depend on when the caller flushes (see the module docs).
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.state {
            State::None(inner) => inner.flush(),
            State::Gzip(_) | State::Zstd(_) => Ok(()),
        }
    }
}

fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, NonZero::get)
}

fn invalid_level(compression: Compression, level: u32, range: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{compression} level {level} is out of range {range}"),
    )
}

/// gzp's `ParCompress`, made safe to drop: its own `Drop` finishes the stream and panics if that
/// fails, and calling anything after one of its calls failed panics too.
struct ParallelGzip<W: Write + Send + 'static> {
    /// `None` once finished or after an error (gzp has shut its threads down by then).
    compressor: Option<ParCompress<'static, Gzip, W>>,
}

impl<W: Write + Send + 'static> ParallelGzip<W> {
    fn finish(mut self) -> io::Result<W> {
        let mut compressor = self.compressor.take().ok_or_else(failed_earlier)?;
        compressor.finish().map_err(gzp_error)
    }
}

impl<W: Write + Send + 'static> Write for ParallelGzip<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let compressor = self.compressor.as_mut().ok_or_else(failed_earlier)?;
        let result = compressor.write(buffer);
        if result.is_err() {
            self.compressor = None;
        }
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        // Dropped unfinished (the caller hit an error): stop gzp's threads without its
        // panicking drop; the stream is abandoned anyway.
        if let Some(mut compressor) = self.compressor.take() {
            let _ = compressor.finish();
        }
    }
}

fn failed_earlier() -> io::Error {
    io::Error::other("the gzip encoder failed earlier")
}

fn gzp_error(error: gzp::GzpError) -> io::Error {
    match error {
        gzp::GzpError::Io(error) => error,
        error => io::Error::other(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half incompressible (xorshift), half text-like, so both deflate paths are exercised.
    fn sample(size: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(size);
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let words: [&[u8]; 6] = [
            b"layer ",
            b"digest ",
            b"snapshot ",
            b"RUN make\n",
            b"0 ",
            b"/usr/",
        ];
        while bytes.len() < size {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if (bytes.len() / 100_000) % 2 == 0 {
                bytes.extend_from_slice(&state.to_le_bytes());
            } else {
                bytes.extend_from_slice(words[(state % 6) as usize]);
            }
        }
        bytes.truncate(size);
        bytes
    }

    fn encode(
        input: &[u8],
        compression: Compression,
        threads: usize,
        write_size: usize,
    ) -> Vec<u8> {
        let options = EncoderOptions {
            level: None,
            threads: NonZero::new(threads),
        };
        let mut encoder = Encoder::with_options(Vec::new(), compression, options).unwrap();
        for chunk in input.chunks(write_size) {
            encoder.write_all(chunk).unwrap();
            encoder.flush().unwrap();
        }
        encoder.finish().unwrap()
    }

    fn decode(bytes: &[u8]) -> Vec<u8> {
        let mut output = Vec::new();
        decompress(bytes).unwrap().read_to_end(&mut output).unwrap();
        output
    }

    #[test]
    fn media_types_round_trip_and_docker_names_are_understood() {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(
                Compression::from_media_type(compression.media_type()),
                Some(compression)
            );
            assert_eq!(
                compression.to_string().parse::<Compression>().unwrap(),
                compression
            );
        }
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type(
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            ),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.config.v1+json"),
            None
        );
        assert!("brotli".parse::<Compression>().is_err());
    }

    #[test]
    fn detects_by_magic_bytes() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 0x08]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(&[0x28, 0xb5, 0x2f]), Compression::None);
        assert_eq!(Compression::detect(b"usr/\0\0\0"), Compression::None);
        assert_eq!(Compression::detect(&[]), Compression::None);
    }

    #[test]
    fn gzip_is_identical_for_one_and_four_threads_and_any_write_size() {
        let input = sample(5 << 20);
        let one = encode(&input, Compression::Gzip, 1, 1 << 16);
        let four = encode(&input, Compression::Gzip, 4, 12_345);
        assert!(
            one == four,
            "gzip output depends on the thread count or write pattern"
        );
        assert!(
            one.len() < input.len() * 3 / 4,
            "{} bytes is not compressed",
            one.len()
        );
        assert_eq!(decode(&one), input);
    }

    #[test]
    fn gzip_header_has_no_timestamp_or_name() {
        let bytes = encode(b"hello", Compression::Gzip, 2, 5);
        // ID1 ID2 CM=deflate FLG=0 (no name, comment or extra) MTIME=0 XFL=0 OS=unknown.
        assert_eq!(bytes[..10], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        let length = bytes.len();
        assert_eq!(bytes[length - 4..], 5u32.to_le_bytes());
    }

    #[test]
    fn zstd_is_identical_for_one_and_four_threads_and_any_write_size() {
        let input = sample(5 << 20);
        let one = encode(&input, Compression::Zstd, 1, 1 << 16);
        let four = encode(&input, Compression::Zstd, 4, 12_345);
        assert!(
            one == four,
            "zstd output depends on the thread count or write pattern"
        );
        assert!(
            one.len() < input.len() * 3 / 4,
            "{} bytes is not compressed",
            one.len()
        );
        assert_eq!(decode(&one), input);
    }

    #[test]
    fn empty_streams_decode_to_nothing() {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let bytes = encode(b"", compression, 1, 1);
            assert_eq!(Compression::detect(&bytes), compression);
            assert_eq!(decode(&bytes), b"", "{compression}");
        }
    }

    #[test]
    fn decompresses_multi_member_gzip_and_multi_frame_zstd() {
        for compression in [Compression::Gzip, Compression::Zstd] {
            let mut joined = encode(b"first member, ", compression, 1, 3);
            joined.extend(encode(b"second member", compression, 1, 3));
            assert_eq!(
                decode(&joined),
                b"first member, second member",
                "{compression}"
            );
        }
    }

    #[test]
    fn detection_survives_a_reader_that_hands_out_one_byte_at_a_time() {
        let bytes = encode(b"tiny reads", Compression::Zstd, 1, 10);
        let reader = io::BufReader::with_capacity(1, &bytes[..]);
        let mut output = Vec::new();
        decompress(reader)
            .unwrap()
            .read_to_end(&mut output)
            .unwrap();
        assert_eq!(output, b"tiny reads");
        assert_eq!(decode(b"ab"), b"ab");
    }

    #[test]
    fn levels_change_the_output_and_bad_levels_are_refused() {
        let input = sample(1 << 20);
        let fast = EncoderOptions {
            level: Some(1),
            threads: None,
        };
        let mut encoder = Encoder::with_options(Vec::new(), Compression::Gzip, fast).unwrap();
        encoder.write_all(&input).unwrap();
        let fast = encoder.finish().unwrap();
        assert_ne!(fast, encode(&input, Compression::Gzip, 2, 1 << 20));
        assert_eq!(decode(&fast), input);
        for (compression, level) in [(Compression::Gzip, 10), (Compression::Zstd, 23)] {
            let options = EncoderOptions {
                level: Some(level),
                threads: None,
            };
            let error = Encoder::with_options(Vec::new(), compression, options)
                .err()
                .unwrap();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
            assert!(error.to_string().contains("out of range"), "{error}");
        }
    }

    struct FailingWriter;

    impl Write for FailingWriter {
        fn write(&mut self, _buffer: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_sink_gives_an_error_not_a_panic() {
        let mut encoder = Encoder::new(FailingWriter, Compression::Gzip).unwrap();
        let input = sample(4 << 20);
        let mut failed = encoder.write_all(&input).is_err();
        failed |= encoder.finish().is_err();
        assert!(failed, "writing into a failing sink succeeded");
        // Dropped unfinished after an error: must not panic either.
        let mut encoder = Encoder::new(FailingWriter, Compression::Gzip).unwrap();
        let _ = encoder.write_all(&input);
        drop(encoder);
    }
}

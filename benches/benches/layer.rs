//! Layer creation benches: a generated ~500 MB tree turned into a layer in a fresh content store.
#![allow(missing_docs)] // criterion's macros generate undocumented functions
//!
//! `cargo bench -p rbuild-benches --bench layer` measures `create_layer` (walk, tar, diff id,
//! compression, blob digest, fsync and rename into the store) with gzip at the default level,
//! zstd and no compression. The tree is made once: 3,000 files in 100 nested directories, most
//! of them 1–256 KiB and one in a hundred 4–16 MiB, each alternating 64 KiB of incompressible
//! bytes and 64 KiB of text, so about half the bytes compress. Throughput counts the
//! uncompressed tar's bytes.

use std::fs::{self, File};
use std::hint::black_box;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rbuild_cache::ContentStore;
use rbuild_cache::compression::Compression;
use rbuild_cache::layer::{LayerOptions, create_layer};

const FILES: usize = 3_000;
const SEGMENT: usize = 64 * 1024;
const WORDS: [&[u8]; 12] = [
    b"layer ",
    b"digest ",
    b"snapshot ",
    b"RUN apt-get install -y ",
    b"make ",
    b"/usr/lib/",
    b"libc.so.6 ",
    b"config ",
    b"0 ",
    b"42 ",
    b"\n",
    b"fn main() { ",
];

/// xorshift64: a seeded, dependency-free PRNG, so the tree is the same on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, limit: u64) -> u64 {
        self.next() % limit
    }
}

fn file_size(random: &mut Random, index: usize) -> usize {
    if index.is_multiple_of(100) {
        (4 << 20) + random.below(12 << 20) as usize
    } else {
        // Log-uniform between 1 KiB and 256 KiB.
        let shift = random.below(8) as u32;
        (1024 << shift) + random.below(1024 << shift) as usize
    }
}

fn write_content(path: &Path, size: usize, random: &mut Random) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(SEGMENT, File::create(path)?);
    let mut segment = Vec::with_capacity(SEGMENT + 64);
    let mut written = 0;
    let mut compressible = random.below(2) == 0;
    while written < size {
        segment.clear();
        let length = SEGMENT.min(size - written);
        while segment.len() < length {
            if compressible {
                segment.extend_from_slice(WORDS[random.below(WORDS.len() as u64) as usize]);
            } else {
                segment.extend_from_slice(&random.next().to_le_bytes());
            }
        }
        out.write_all(&segment[..length])?;
        written += length;
        compressible = !compressible;
    }
    out.flush()
}

/// Makes the tree; returns the bytes of file content in it.
fn make_tree(root: &Path) -> u64 {
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut total = 0;
    for index in 0..FILES {
        let directory = root.join(format!("dir{:02}/sub{:02}", index % 10, (index / 10) % 10));
        fs::create_dir_all(&directory).expect("create directory");
        let size = file_size(&mut random, index);
        write_content(
            &directory.join(format!("file{index:04}")),
            size,
            &mut random,
        )
        .expect("write file");
        total += size as u64;
    }
    total
}

fn benches(criterion: &mut Criterion) {
    let tree = tempfile::tempdir().expect("tempdir");
    let content = make_tree(tree.path());
    eprintln!(
        "layer bench tree: {FILES} files, {:.1} MB of content",
        content as f64 / 1e6
    );
    let mut group = criterion.benchmark_group("create_layer");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1));
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let options = LayerOptions {
            compression,
            ..LayerOptions::default()
        };
        let store_directory = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(store_directory.path()).expect("store");
        let layer = create_layer(tree.path(), &options, &store).expect("layer");
        eprintln!(
            "{compression} at level {}: {:.1} MB tar -> {:.1} MB blob ({:.1}%)",
            compression.default_level(),
            layer.uncompressed_size as f64 / 1e6,
            layer.size as f64 / 1e6,
            layer.size as f64 * 100.0 / layer.uncompressed_size as f64
        );
        drop(store_directory);
        group.throughput(Throughput::Bytes(layer.uncompressed_size));
        // Ten runs: about 5 s each for gzip on two cores, 1 s for the others.
        let seconds = if compression == Compression::Gzip {
            55
        } else {
            15
        };
        group.measurement_time(Duration::from_secs(seconds));
        group.bench_function(compression.name(), |bencher| {
            bencher.iter_batched(
                || {
                    let directory = tempfile::tempdir().expect("tempdir");
                    let store = ContentStore::open(directory.path()).expect("store");
                    (directory, store)
                },
                |(directory, store)| {
                    let layer = create_layer(tree.path(), &options, &store).expect("layer");
                    // Returned so the store is deleted outside the measurement.
                    (directory, black_box(layer))
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

criterion_group!(layer, benches);
criterion_main!(layer);

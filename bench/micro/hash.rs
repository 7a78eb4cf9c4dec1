//! SHA-256 of a 1 GiB file: imgbuild's hasher (the one every qcow2 artifact
//! and base image goes through) against coreutils' `sha256sum`. Both read
//! the file from the page cache (it is read once before measuring), so this
//! is the hashing speed, not the disk's. bench/run.sh compares the result
//! with `openssl speed -evp sha256`, the SHA-NI limit of the machine.
//!
//!   cargo bench --bench hash
//!   IMGBUILD_BENCH_HASH_FILE=/path/to/1GiB.bin cargo bench --bench hash

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use imgbuild_builders::common::artifact::sha256_file;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 1 << 30;

/// The file to hash: $IMGBUILD_BENCH_HASH_FILE, or 1 GiB of pseudo-random
/// bytes made once in the temporary directory.
fn hash_file() -> PathBuf {
    if let Some(path) = std::env::var_os("IMGBUILD_BENCH_HASH_FILE") {
        return path.into();
    }
    let path = std::env::temp_dir().join("imgbuild-bench-hash-1GiB.bin");
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(SIZE) {
        let partial = path.with_extension("partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).unwrap());
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            for chunk in block.chunks_mut(8) {
                // xorshift64*: incompressible enough; SHA-256 does not care.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                chunk.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
            }
            out.write_all(&block).unwrap();
        }
        out.into_inner().unwrap().sync_all().unwrap();
        std::fs::rename(&partial, &path).unwrap();
    }
    path
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn hashing(c: &mut Criterion) {
    let path = hash_file();
    let size = std::fs::metadata(&path).unwrap().len();
    // Into the page cache, and a check that both hashers agree.
    let (read, digest) = sha256_file(&path).unwrap();
    assert_eq!(read, size);
    assert_eq!(digest, sha256sum(&path), "imgbuild and sha256sum disagree");

    let mut group = c.benchmark_group("sha256_1GiB");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Bytes(size));
    group.bench_function("imgbuild_sha256_file", |b| {
        b.iter(|| sha256_file(&path).unwrap())
    });
    group.bench_function("sha256sum", |b| b.iter(|| sha256sum(&path)));
    group.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);

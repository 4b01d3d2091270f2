//! `collect` over every fixture tree and over the live root `/`. The budget is 20 ms per collection.
//!
//! Run: `cargo bench -p nimbus-inventory --bench collect`.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};

const FIXTURES: &[&str] = &[
    "aws-nitro-i3en",
    "aws-xen-i3",
    "azure-lsv2",
    "vmware",
    "opennebula-kvm",
    "baremetal",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn bench_collect(c: &mut Criterion) {
    let mut group = c.benchmark_group("collect");
    for name in FIXTURES {
        let root = fixture(name);
        group.bench_function(*name, |b| b.iter(|| black_box(inventory::collect(black_box(&root)))));
    }
    group.bench_function("live-root", |b| {
        b.iter(|| black_box(inventory::collect(black_box(Path::new("/")))))
    });
    group.finish();

    // What a timer tick costs beyond collecting: the change check.
    let inv = inventory::collect(&fixture("baremetal")).inventory;
    c.bench_function("fingerprint/baremetal", |b| {
        b.iter(|| black_box(black_box(&inv).fingerprint()))
    });
}

criterion_group!(benches, bench_collect);
criterion_main!(benches);

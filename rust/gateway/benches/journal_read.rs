//! Throughput of `journal_reader::read_segment`, the Rust half of ingestion: one segment of
//! realistic records read back in batches. `cargo bench -p onetoken-gateway --bench
//! journal_read`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Instant;

use onetoken_gateway::journal_reader::read_segment;
use onetoken_gateway::CallRecord;

const RECORDS: u32 = 200_000;
const BATCH: usize = 10_000;

fn main() {
    let dir = std::env::temp_dir().join(format!("onetoken-read-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("journal-bench-00000000.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..RECORDS {
        let rec = CallRecord::sample(i);
        // The journal's line format is serde_json's, byte for byte (records.rs tests it).
        serde_json::to_writer(&mut out, &rec).unwrap();
        out.write_all(b"\n").unwrap();
    }
    drop(out);
    let bytes = std::fs::metadata(&path).unwrap().len();
    for round in 0..3 {
        let started = Instant::now();
        let (mut offset, mut read) = (0, 0);
        loop {
            let batch = read_segment(&path, offset, BATCH, true).unwrap();
            if batch.records.is_empty() {
                break;
            }
            read += batch.records.len();
            offset = batch.next_offset;
        }
        let took = started.elapsed();
        assert_eq!(read, RECORDS as usize);
        println!(
            "round {round}: {read} records ({bytes} bytes) in {took:?}: {:.0} records/s, {:.0} ns/record",
            read as f64 / took.as_secs_f64(),
            took.as_nanos() as f64 / read as f64
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

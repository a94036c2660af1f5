//! Generates partition sets in the layout `dgl.distributed.partition_graph` writes.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;

/// Writes `<dir>/<name>.json` and `<dir>/part{i}/{graph,node_feat,edge_feat}.dgl`, each file
/// `bytes_per_file` bytes of deterministic pseudo-random data. Returns the JSON's path.
pub fn gen_partitions(
    dir: &Path,
    parts: usize,
    bytes_per_file: u64,
    name: &str,
) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let mut doc = serde_json::Map::new();
    doc.insert("graph_name".into(), name.into());
    doc.insert("num_nodes".into(), (1000 * parts).into());
    doc.insert("num_edges".into(), (10000 * parts).into());
    doc.insert("part_method".into(), "metis".into());
    doc.insert("num_parts".into(), parts.into());
    doc.insert("halo_hops".into(), 1.into());
    let ranges: Vec<serde_json::Value> = (0..parts)
        .map(|i| serde_json::json!([i * 1000, (i + 1) * 1000]))
        .collect();
    doc.insert("node_map".into(), serde_json::json!({ "_N": ranges }));
    let eranges: Vec<serde_json::Value> = (0..parts)
        .map(|i| serde_json::json!([i * 10000, (i + 1) * 10000]))
        .collect();
    doc.insert(
        "edge_map".into(),
        serde_json::json!({ "_N:_E:_N": eranges }),
    );
    doc.insert("ntypes".into(), serde_json::json!({ "_N": 0 }));
    doc.insert("etypes".into(), serde_json::json!({ "_N:_E:_N": 0 }));
    for i in 0..parts {
        let pdir = dir.join(format!("part{i}"));
        fs::create_dir_all(&pdir)?;
        for (n, f) in ["node_feat.dgl", "edge_feat.dgl", "graph.dgl"]
            .iter()
            .enumerate()
        {
            write_random(&pdir.join(f), bytes_per_file, (i as u64) << 8 | n as u64)?;
        }
        doc.insert(
            format!("part-{i}"),
            serde_json::json!({
                "node_feats": format!("part{i}/node_feat.dgl"),
                "edge_feats": format!("part{i}/edge_feat.dgl"),
                "part_graph": format!("part{i}/graph.dgl"),
            }),
        );
    }
    let json = dir.join(format!("{name}.json"));
    fs::write(
        &json,
        serde_json::to_vec_pretty(&serde_json::Value::Object(doc))?,
    )?;
    Ok(json)
}

/// Fills a file with xorshift output: fast, deterministic, incompressible enough.
pub fn write_random(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    Ok(())
}

//! Requests tests send to an agent directly, built as `dgl-coord` would build them.

use dglrun_proto::digest::hash_reader;
use dglrun_proto::pb::{self, put_file_message::Msg};

/// The manifest of `data` placed at `path` (mode 0644).
pub fn manifest(path: &str, data: &[u8]) -> pb::FileManifest {
    let d = hash_reader(data, |_| {}).expect("hashing bytes in memory cannot fail");
    pb::FileManifest {
        path: path.into(),
        size: d.size,
        digest: d.digest.to_vec(),
        chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
        mode: 0o644,
    }
}

/// The first message of a PutFile of `data` at `path`, from offset 0.
pub fn put_header(path: &str, data: &[u8]) -> pb::PutFileMessage {
    pb::PutFileMessage {
        msg: Some(Msg::Header(pb::PutFileHeader {
            manifest: Some(manifest(path, data)),
            offset: 0,
        })),
    }
}

/// A whole PutFile of `data` at `path`: the header, then one chunk (`data` under one chunk).
pub fn put_messages(path: &str, data: &[u8]) -> Vec<pb::PutFileMessage> {
    let chunk = pb::PutFileMessage {
        msg: Some(Msg::Chunk(pb::Chunk {
            offset: 0,
            data: data.to_vec().into(),
            ..Default::default()
        })),
    };
    vec![put_header(path, data), chunk]
}

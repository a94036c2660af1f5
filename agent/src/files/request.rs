//! File requests from the wire, parsed once into typed values: after this, `files` sees no
//! `pb` request type, and every bound is checked here.

use bytes::Bytes;
use dglrun_proto::compress::max_frame_len;
use dglrun_proto::pb::{self, put_file_message::Msg};

use super::error::FilesError;
use super::manifest::Manifest;
use crate::confine::{Root, WirePath};
use crate::limits::MAX_FILES_PER_PREPARE;

/// One file a request names: where it goes (confined, not reserved) and what it must hold.
#[derive(Clone, Debug)]
pub struct FileSpec {
    pub path: WirePath,
    pub manifest: Manifest,
}

impl FileSpec {
    pub fn parse(root: &Root, m: pb::FileManifest) -> Result<Self, FilesError> {
        let manifest = Manifest::from_pb(m)?;
        let path = root.parse(&manifest.path)?;
        path.check_not_reserved()?;
        path.split()?;
        Ok(Self { path, manifest })
    }
}

/// A PrepareFiles request.
#[derive(Debug)]
pub struct PrepareFiles {
    pub files: Vec<FileSpec>,
}

impl PrepareFiles {
    pub fn parse(root: &Root, req: pb::PrepareFilesRequest) -> Result<Self, FilesError> {
        if req.files.len() > MAX_FILES_PER_PREPARE {
            return Err(FilesError::Invalid(format!(
                "{} files in one request exceed the agent's limit of {MAX_FILES_PER_PREPARE}",
                req.files.len()
            )));
        }
        let files = req
            .files
            .into_iter()
            .map(|f| FileSpec::parse(root, f))
            .collect::<Result<_, _>>()?;
        Ok(Self { files })
    }
}

/// The first message of a PutFile stream.
#[derive(Debug)]
pub struct PutHeader {
    pub file: FileSpec,
    /// Where the chunks start: a chunk boundary within the file, or its end.
    pub offset: u64,
}

impl PutHeader {
    pub fn parse(root: &Root, msg: Option<pb::PutFileMessage>) -> Result<Self, FilesError> {
        let header = match msg {
            Some(pb::PutFileMessage {
                msg: Some(Msg::Header(h)),
            }) => h,
            Some(_) => {
                return Err(FilesError::Invalid(
                    "the first message of PutFile must be a PutFileHeader".into(),
                ))
            }
            None => return Err(FilesError::Invalid("empty PutFile stream".into())),
        };
        let m = header
            .manifest
            .ok_or_else(|| FilesError::Invalid("PutFileHeader without a manifest".into()))?;
        let file = FileSpec::parse(root, m)?;
        let (m, offset) = (&file.manifest, header.offset);
        if !m.is_valid_offset(offset) {
            return Err(FilesError::Invalid(format!(
                "{}: offset {offset} is not a chunk boundary within its {} bytes",
                m.path, m.size
            )));
        }
        Ok(Self { file, offset })
    }
}

/// A chunk checked against the manifest: exactly the next chunk expected, of its full length
/// (a compressed one: a frame no longer than a frame of that length can be; the writer checks
/// what it holds).
#[derive(Debug)]
pub struct Chunk {
    pub offset: u64,
    /// The chunk's length as the manifest has it.
    pub len: u64,
    pub data: Bytes,
    pub compression: pb::Compression,
}

impl Chunk {
    /// `next` is the offset the transfer expects now.
    pub fn parse(msg: pb::PutFileMessage, m: &Manifest, next: u64) -> Result<Self, FilesError> {
        let refuse = |reason: String| FilesError::Invalid(format!("{}: {reason}", m.path));
        let chunk = match msg.msg {
            Some(Msg::Chunk(c)) => c,
            _ => return Err(refuse("expected a chunk, got another header".into())),
        };
        if chunk.offset != next {
            return Err(refuse(format!(
                "chunk at offset {}, expected {next}",
                chunk.offset
            )));
        }
        if next >= m.size {
            return Err(refuse(format!(
                "chunk at offset {next} is past the end ({} bytes)",
                m.size
            )));
        }
        let len = chunk.data.len() as u64;
        let expected = m.chunk_len_at(next);
        // An unknown value is refused, not read as raw: it would be taken for the chunk's bytes.
        let compression = pb::Compression::try_from(chunk.compression).map_err(|_| {
            refuse(format!(
                "chunk at offset {next} uses an unknown compression ({}); is dgl-coord newer \
                 than this agent?",
                chunk.compression
            ))
        })?;
        match compression {
            pb::Compression::None if len != expected => {
                return Err(refuse(format!(
                    "chunk at offset {next} has {len} bytes, expected {expected}"
                )));
            }
            // Bounded here, before it is queued; what it holds is checked by the writer.
            pb::Compression::Zstd if len > max_frame_len(expected as usize) as u64 => {
                return Err(refuse(format!(
                    "chunk at offset {next} is a zstd frame of {len} bytes, longer than any \
                     frame of its {expected} bytes can be"
                )));
            }
            _ => {}
        }
        Ok(Self {
            offset: chunk.offset,
            len: expected,
            data: chunk.data,
            compression,
        })
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::confine::STATE_DIR;
    use dglrun_proto::digest::chunk_count;
    use dglrun_proto::CHUNK_SIZE;
    use proptest::prelude::*;
    use std::path::Component;

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z./]{0,12}",
            "[\\PC]{0,12}",
            Just(".dglrun/jobs.json".to_string()),
            Just("ws/.a.dglrun-partial".to_string()),
            Just("../x".to_string()),
            Just("/etc/passwd".to_string()),
            Just(".".to_string()),
        ]
    }

    fn manifest() -> impl Strategy<Value = pb::FileManifest> {
        (
            path(),
            0u64..(3 * CHUNK_SIZE as u64),
            0usize..5,
            0usize..40,
            any::<u32>(),
        )
            .prop_map(|(path, size, n, dlen, mode)| pb::FileManifest {
                path,
                size,
                digest: vec![0; dlen],
                chunk_hashes: vec![vec![0; 32]; n],
                mode,
            })
    }

    fn assert_confined(root: &Root, f: &FileSpec) {
        let rel = f.path.rel();
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
        assert!(rel.file_name().is_some());
        assert!(rel.components().next() != Some(Component::Normal(STATE_DIR.as_ref())));
        assert!(root.path().join(rel).starts_with(root.path()));
        assert_eq!(f.manifest.chunks.len(), chunk_count(f.manifest.size));
        assert_eq!(f.manifest.mode & !0o777, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn prepare_parses_without_panicking(files in proptest::collection::vec(manifest(), 0..4)) {
            let d = tempfile::tempdir().unwrap();
            let root = Root::new(d.path()).unwrap();
            if let Ok(p) = PrepareFiles::parse(&root, pb::PrepareFilesRequest { files }) {
                for f in &p.files {
                    assert_confined(&root, f);
                }
            }
        }

        #[test]
        fn put_messages_parse_without_panicking(
            m in manifest(),
            offset in any::<u64>(),
            header_first in any::<bool>(),
            chunk_offset in any::<u64>(),
            chunk_len in 0usize..(CHUNK_SIZE + 10),
            compression in any::<i32>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            let root = Root::new(d.path()).unwrap();
            let first = if header_first {
                Msg::Header(pb::PutFileHeader { manifest: Some(m), offset })
            } else {
                Msg::Chunk(pb::Chunk::default())
            };
            if let Ok(h) = PutHeader::parse(&root, Some(pb::PutFileMessage { msg: Some(first) })) {
                assert_confined(&root, &h.file);
                prop_assert!(h.file.manifest.is_valid_offset(h.offset));
                let msg = pb::PutFileMessage { msg: Some(Msg::Chunk(pb::Chunk {
                    offset: chunk_offset,
                    data: vec![0u8; chunk_len].into(),
                    compression,
                })) };
                if let Ok(c) = Chunk::parse(msg, &h.file.manifest, h.offset) {
                    prop_assert_eq!(c.offset, h.offset);
                    prop_assert!(c.offset < h.file.manifest.size);
                    prop_assert_eq!(c.len, h.file.manifest.chunk_len_at(c.offset));
                    prop_assert!(c.data.len() <= max_frame_len(c.len as usize));
                }
            }
        }
    }
}

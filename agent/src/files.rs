//! Receiving files: prepare (what is already there, where to resume) and put (verify, write,
//! rename).

use dglrun_proto::pb;
use tonic::{Status, Streaming};

use crate::confine::Root;

pub struct Files {
    root: Root,
}

impl Files {
    pub fn new(root: Root) -> Self {
        Self { root }
    }

    pub async fn prepare(
        &self,
        _req: pb::PrepareFilesRequest,
    ) -> Result<pb::PrepareFilesReply, Status> {
        let _ = &self.root;
        Err(Status::unimplemented("prepare"))
    }

    pub async fn put(
        &self,
        _stream: Streaming<pb::PutFileMessage>,
    ) -> Result<pb::PutFileReply, Status> {
        Err(Status::unimplemented("put"))
    }
}

//! Jobs: supervised process groups, their output, their leases.

use std::sync::Arc;
use std::time::Duration;

use dglrun_proto::pb;
use tonic::Status;

use crate::confine::Root;
use crate::service::EventStream;

#[derive(Clone, Debug)]
pub struct JobsConfig {
    pub lease_timeout: Duration,
    pub grace: Duration,
}

pub struct Jobs {
    root: Root,
    config: JobsConfig,
}

impl Jobs {
    pub fn start(root: Root, config: JobsConfig) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self { root, config }))
    }

    pub async fn preflight(
        &self,
        _req: pb::PreflightRequest,
    ) -> Result<pb::PreflightReply, Status> {
        let _ = (&self.root, &self.config);
        Err(Status::unimplemented("preflight"))
    }

    pub async fn spawn(&self, _req: pb::SpawnRequest) -> Result<pb::SpawnReply, Status> {
        Err(Status::unimplemented("spawn"))
    }

    pub fn watch(&self, _req: pb::WatchRequest) -> Result<EventStream, Status> {
        Err(Status::unimplemented("watch"))
    }

    pub fn renew(&self, _req: pb::RenewRequest) -> Result<pb::RenewReply, Status> {
        Err(Status::unimplemented("renew"))
    }

    pub async fn stop(&self, _req: pb::StopRequest) -> Result<pb::StopReply, Status> {
        Err(Status::unimplemented("stop"))
    }

    pub fn list(&self) -> pb::ListJobsReply {
        pb::ListJobsReply::default()
    }

    /// Stops every job; called when the agent itself is asked to exit.
    pub async fn shutdown(&self) {}
}

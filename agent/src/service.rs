//! The gRPC surface: translates calls to `files` and `jobs`, owns nothing itself.

use std::pin::Pin;
use std::sync::Arc;

use dglrun_proto::pb::{self, agent_server::Agent};
use dglrun_proto::{PROTOCOL_VERSION, VERSION};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use tokio::sync::Semaphore;

use crate::confine::Root;
use crate::files::Files;
use crate::jobs::Jobs;
use crate::limits;

pub struct AgentService {
    pub root: Root,
    pub files: Arc<Files>,
    pub jobs: Arc<Jobs>,
    /// Bounds the transfers served at once.
    pub transfers: Arc<Semaphore>,
}

impl AgentService {
    pub fn new(root: Root, files: Arc<Files>, jobs: Arc<Jobs>) -> Self {
        Self {
            root,
            files,
            jobs,
            transfers: Arc::new(Semaphore::new(limits::MAX_CONCURRENT_TRANSFERS)),
        }
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

/// Free bytes on the file system that holds `path`.
pub fn free_bytes(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(
        &self,
        _req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        Ok(Response::new(pb::HelloReply {
            protocol_version: PROTOCOL_VERSION,
            agent_version: VERSION.to_string(),
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            root: self.root.path().display().to_string(),
            free_bytes: free_bytes(self.root.path()),
            pid: std::process::id(),
        }))
    }

    async fn prepare_files(
        &self,
        req: Request<pb::PrepareFilesRequest>,
    ) -> Result<Response<pb::PrepareFilesReply>, Status> {
        let req = req.into_inner();
        limits::check_prepare(&req)?;
        self.files.prepare(req).await.map(Response::new)
    }

    async fn put_file(
        &self,
        req: Request<Streaming<pb::PutFileMessage>>,
    ) -> Result<Response<pb::PutFileReply>, Status> {
        let _permit = self.transfers.clone().try_acquire_owned().map_err(|_| {
            dglrun_proto::busy::status(
                format!(
                    "the agent already serves {} transfers; retry later",
                    limits::MAX_CONCURRENT_TRANSFERS
                ),
                std::time::Duration::from_millis(500),
            )
        })?;
        self.files.put(req.into_inner()).await.map(Response::new)
    }

    async fn preflight(
        &self,
        req: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightReply>, Status> {
        let req = req.into_inner();
        limits::check_preflight(&req)?;
        self.jobs.preflight(req).await.map(Response::new)
    }

    async fn spawn(
        &self,
        req: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnReply>, Status> {
        let req = req.into_inner();
        limits::check_spawn(&req)?;
        self.jobs.spawn(req).await.map(Response::new)
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        limits::check_job_id(&req.job_id)?;
        self.jobs.watch(req).map(Response::new)
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewReply>, Status> {
        let req = req.into_inner();
        limits::check_job_id(&req.job_id)?;
        self.jobs.renew(req).map(Response::new)
    }

    async fn stop(&self, req: Request<pb::StopRequest>) -> Result<Response<pb::StopReply>, Status> {
        let req = req.into_inner();
        limits::check_job_id(&req.job_id)?;
        self.jobs.stop(req).await.map(Response::new)
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        Ok(Response::new(self.jobs.list()))
    }
}

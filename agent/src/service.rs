//! The gRPC surface: translates calls to `files` and `jobs`, owns nothing itself. Each job
//! request is parsed once here into its `jobs::spec` type (bounds from `limits`); a
//! `JobError` becomes a status in one place (`jobs::error`).

use std::sync::Arc;

use dglrun_proto::pb::{self, agent_server::Agent};
use dglrun_proto::PROTOCOL_VERSION;
use tonic::{Request, Response, Status, Streaming};

use tokio::sync::Semaphore;

use crate::blocking;
use crate::confine::Root;
use crate::files::request::PrepareFiles;
use crate::files::Files;
use crate::host_facts;
use crate::jobs::preflight::Preflight;
use crate::jobs::session::SessionSpec;
use crate::jobs::spec::{JobId, SpawnSpec, StopSpec, WatchSpec};
use crate::jobs::{EventStream, Jobs};
use crate::limits;
use crate::supervise::Supervisor;
use dglrun_coordinator::launch::supervised::Supervision;

pub struct AgentService {
    pub root: Root,
    pub files: Arc<Files>,
    pub jobs: Arc<Jobs>,
    /// Bounds the transfers served at once.
    pub transfers: Arc<Semaphore>,
    /// Detached jobs this agent supervises.
    pub supervisor: Arc<Supervisor>,
}

impl AgentService {
    pub fn new(root: Root, files: Arc<Files>, jobs: Arc<Jobs>) -> Self {
        Self {
            root,
            files,
            jobs,
            transfers: Arc::new(Semaphore::new(limits::MAX_CONCURRENT_TRANSFERS)),
            supervisor: Supervisor::disabled(),
        }
    }

    pub fn with_supervisor(mut self, supervisor: Arc<Supervisor>) -> Self {
        self.supervisor = supervisor;
        self
    }
}

/// How long a Session may take to name its command.
const SESSION_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long Hello waits for the free space of the root (a hung mount must not hang Hello).
const FREE_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(
        &self,
        _req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let root = self.root.clone();
        // Unknown (0) rather than late.
        let free_bytes = blocking::run("statvfs of the root", FREE_BYTES_TIMEOUT, move || {
            root.free_bytes()
        })
        .await
        .unwrap_or(0);
        Ok(Response::new(pb::HelloReply {
            protocol_version: PROTOCOL_VERSION,
            agent_version: crate::test_hooks::reported_version(),
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            root: self.root.path().display().to_string(),
            free_bytes,
            pid: std::process::id(),
            interfaces: host_facts::interfaces(),
            env_set: host_facts::env_set(),
            unix_time_ms: crate::test_hooks::reported_clock(host_facts::unix_time_ms()),
        }))
    }

    async fn prepare_files(
        &self,
        req: Request<pb::PrepareFilesRequest>,
    ) -> Result<Response<pb::PrepareFilesReply>, Status> {
        let req = PrepareFiles::parse(&self.root, req.into_inner())?;
        Ok(Response::new(self.files.prepare(req).await?))
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
        Ok(Response::new(self.files.put(req.into_inner()).await?))
    }

    async fn preflight(
        &self,
        req: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightReply>, Status> {
        let req = Preflight::parse(&self.root, req.into_inner())?;
        self.jobs.preflight(req).await.map(Response::new)
    }

    async fn spawn(
        &self,
        req: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnReply>, Status> {
        let spec = SpawnSpec::try_from(req.into_inner())?;
        crate::test_hooks::before_spawn().await;
        Ok(Response::new(self.jobs.spawn(spec).await?))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let spec = WatchSpec::try_from(req.into_inner())?;
        Ok(Response::new(self.jobs.watch(spec)?))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewReply>, Status> {
        let id = JobId::try_from(req.into_inner())?;
        Ok(Response::new(self.jobs.renew(&id)))
    }

    async fn job_cpu(
        &self,
        req: Request<pb::JobCpuRequest>,
    ) -> Result<Response<pb::JobCpuReply>, Status> {
        let id = JobId::parse(req.into_inner().job_id)?;
        Ok(Response::new(self.jobs.cpu(&id).await?))
    }

    async fn stop(&self, req: Request<pb::StopRequest>) -> Result<Response<pb::StopReply>, Status> {
        let spec = StopSpec::try_from(req.into_inner())?;
        Ok(Response::new(self.jobs.stop(spec).await?))
    }

    async fn wait_listening(
        &self,
        req: Request<pb::WaitListeningRequest>,
    ) -> Result<Response<pb::WaitListeningReply>, Status> {
        let spec = crate::jobs::listening::WaitSpec::try_from(req.into_inner())?;
        Ok(Response::new(self.jobs.wait_listening(spec).await?))
    }

    async fn dump_stacks(
        &self,
        req: Request<pb::DumpStacksRequest>,
    ) -> Result<Response<pb::DumpStacksReply>, Status> {
        let spec = crate::jobs::stacks::StacksSpec::try_from(req.into_inner())?;
        Ok(Response::new(self.jobs.dump_stacks(spec).await?))
    }

    type SessionStream = crate::jobs::session::OutputStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::SessionInput>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut input = req.into_inner();
        let first = tokio::time::timeout(SESSION_START_TIMEOUT, input.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no SessionStart within {} s",
                    SESSION_START_TIMEOUT.as_secs()
                ))
            })??;
        let Some(pb::SessionInput {
            msg: Some(pb::session_input::Msg::Start(start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "a Session's first message must be a SessionStart",
            ));
        };
        let spec = SessionSpec::try_from(start)?;
        Ok(Response::new(self.jobs.session(spec, input).await?))
    }

    async fn supervise(
        &self,
        req: Request<pb::SuperviseRequest>,
    ) -> Result<Response<pb::SuperviseReply>, Status> {
        let req = req.into_inner();
        JobId::parse(req.job_id.clone())?;
        let s = Supervision::parse(req).map_err(crate::status::supervise)?;
        Ok(Response::new(self.supervisor.supervise(s).await?))
    }

    async fn wait_job(
        &self,
        req: Request<pb::WaitJobRequest>,
    ) -> Result<Response<pb::WaitJobReply>, Status> {
        Ok(Response::new(self.supervisor.wait(req.into_inner()).await?))
    }

    async fn job_records(
        &self,
        req: Request<pb::JobRecordsRequest>,
    ) -> Result<Response<pb::JobRecordsReply>, Status> {
        let req = req.into_inner();
        let job = match req.job_id.is_empty() {
            true => None,
            false => Some(JobId::parse(req.job_id)?),
        };
        Ok(Response::new(self.jobs.job_records(job.as_ref())))
    }

    type ReadLogsStream = crate::jobs::log_read::LogStream;

    async fn read_logs(
        &self,
        req: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        let spec = crate::jobs::log_read::ReadSpec::try_from(req.into_inner())?;
        Ok(Response::new(self.jobs.read_logs(spec)?))
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        Ok(Response::new(self.jobs.list().await?))
    }
}

//! Helpers for suites that drive the real binaries: the workspace's programs (built as the
//! current sources say), real S3 servers and PostgreSQL, `s3dedup-api` instances, proxies that
//! inject faults, and workloads that check what was acknowledged. Every process is killed when
//! its handle drops.

mod api;
mod client;
mod content;
pub mod fault_proxy;
pub mod ledger;
mod postgres;
mod process;
mod report;
mod reports;
mod s3;
pub mod stall_proxy;
mod workload;

pub use api::*;
pub use client::*;
pub use content::*;
pub use postgres::*;
pub use process::*;
pub use report::*;
pub use reports::*;
pub use s3::*;
pub use workload::*;

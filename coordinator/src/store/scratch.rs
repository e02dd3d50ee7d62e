//! A throwaway schema in a PostgreSQL server, for tests and benchmarks: each gets a schema of
//! its own (`fedlora_scratch_…`), dropped when the [`ScratchSchema`] is.

use tokio_postgres::NoTls;

use super::postgres::pg;
use crate::error::Result;

/// The environment variable that names the test server (`.ci/run` sets it to the throwaway
/// cluster that `tools/pg-throwaway` starts).
pub const TEST_URL_ENV: &str = "FEDLORA_TEST_POSTGRES_URL";

/// A schema of its own in a PostgreSQL server, dropped on drop.
pub struct ScratchSchema {
    base: String,
    name: String,
}

impl ScratchSchema {
    /// Creates a fresh schema in the server at `base` (a postgres:// URL).
    pub fn create(base: &str) -> Result<Self> {
        let name = format!(
            "fedlora_scratch_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        run(base, &format!("CREATE SCHEMA {name}"))?;
        Ok(Self {
            base: base.to_string(),
            name,
        })
    }

    /// For a test: a fresh schema in the server that [`TEST_URL_ENV`] names. Without it, under
    /// CI (`CI` set) this panics (a test that needs the server must fail there, never skip);
    /// elsewhere it prints one `SKIPPED:` line naming `what` and returns `None`.
    pub fn for_test(what: &str) -> Option<Self> {
        match std::env::var(TEST_URL_ENV) {
            Ok(u) if !u.is_empty() => Some(Self::create(&u).expect("create a scratch schema")),
            _ if std::env::var_os("CI").is_some() => panic!(
                "{TEST_URL_ENV} is not set: .ci/run starts a throwaway PostgreSQL \
                 (tools/pg-throwaway) and sets it"
            ),
            _ => {
                println!(
                    "SKIPPED: {what} needs PostgreSQL: set {TEST_URL_ENV} \
                     (`tools/pg-throwaway start DIR` prints a URL)"
                );
                None
            }
        }
    }

    /// The URL of the server with this schema first on the search path.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", self.base, self.name)
    }
}

impl Drop for ScratchSchema {
    fn drop(&mut self) {
        let _ = run(
            &self.base,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

/// Runs `sql` over a connection of its own.
fn run(url: &str, sql: &str) -> Result<()> {
    // a runtime on a thread of its own: the caller may be inside another runtime
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(url, NoTls).await.map_err(pg)?;
                let conn = tokio::spawn(conn);
                client.batch_execute(sql).await.map_err(pg)?;
                drop(client);
                let _ = conn.await;
                Ok(())
            })
        })
        .join()
        .unwrap_or_else(|_| Err(super::codec::storage("the scratch-schema thread panicked")))
    })
}

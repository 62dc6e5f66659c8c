//! A gateway as a child process, for what only a real process can show: signals
//! (SIGTERM drain, SIGKILL loss) and exit codes.

use std::{collections::HashMap, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

use crate::{WAIT, free_port};

/// A running `chat-gateway` process, killed on drop.
pub struct GatewayProcess {
    child: Child,
    port: u16,
    /// Log lines after start-up (JSON), for tests that look for an event.
    pub logs: mpsc::UnboundedReceiver<String>,
    /// Reads stdout into `logs`.
    forward: tokio::task::JoinHandle<()>,
}

impl GatewayProcess {
    /// Starts `bin` with `vars` (plus `PORT`, `HOST=127.0.0.1`, `LOG_FORMAT=json`) and
    /// waits for its "listening" log line.
    pub async fn spawn(bin: &str, vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_with(bin, vars, false).await
    }

    /// Like [`GatewayProcess::spawn`], with stderr piped too, so that
    /// [`GatewayProcess::close_logs`] can close both of the process's log pipes.
    pub async fn spawn_with_piped_logs(bin: &str, vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_with(bin, vars, true).await
    }

    async fn spawn_with(
        bin: &str,
        vars: &[(&str, &str)],
        pipe_stderr: bool,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let mut env: HashMap<&str, String> =
            vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
        env.insert("PORT", port.to_string());
        env.insert("HOST", "127.0.0.1".into());
        env.insert("LOG_FORMAT", "json".into());
        env.entry("APP_ENV").or_insert_with(|| "production".into());
        // Start-up is detected by the "listening" line, whatever else is filtered.
        let filter = env
            .get("RUST_LOG")
            .cloned()
            .unwrap_or_else(|| "info".into());
        env.insert("RUST_LOG", format!("{filter},chat_gateway::app=info"));
        let mut child = Command::new(bin)
            .env_clear()
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(if pipe_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (tx, logs) = mpsc::unbounded_channel();
        let started = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(r#""message":"listening""#) {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        if !matches!(started, Ok(Ok(true))) {
            bail!("{bin} did not start listening");
        }
        let forward = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(GatewayProcess {
            child,
            port,
            logs,
            forward,
        })
    }

    /// Closes the read ends of the process's log pipes, as a log shipper that exits does:
    /// its next writes fail with a broken pipe.
    pub async fn close_logs(&mut self) {
        self.forward.abort();
        let _ = (&mut self.forward).await;
        drop(self.child.stderr.take());
    }

    /// `ws://127.0.0.1:PORT{path}`
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("process already reaped")
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...).
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid()?.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{name} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit (at most `limit`); returns its exit code (None when
    /// killed by a signal).
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .context("the gateway did not exit in time")??;
        Ok(status.code())
    }

    /// GET `path` and return the status code, or `None` when nothing answers.
    pub async fn get_status(&self, path: &str) -> Option<u16> {
        crate::gateway::http_status(([127, 0, 0, 1], self.port).into(), path)
            .await
            .ok()
    }
}

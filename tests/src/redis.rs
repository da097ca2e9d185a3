//! A real `redis-server` for the tests: started on a free loopback port with no persistence in
//! a temporary directory, stopped and restarted on demand (same port, so clients reconnect),
//! killed on drop. [`RedisServer::command`] speaks RESP directly, so tests read back exactly
//! what the backend wrote (`KEYS`, `TTL`, `INFO commandstats`) without another client library.
//! [`RedisServer::start_in`] runs it inside a test namespace instead, for an agent started
//! there.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a started server gets to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on `127.0.0.1:port`.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The namespace it runs in (name, open fd), if not the caller's.
    netns: Option<(String, File)>,
    /// More `redis-server` arguments (cluster mode, TLS, a password...).
    extra: Vec<String>,
    /// The password [`Self::command`] authenticates with (`--requirepass`).
    password: Option<String>,
}

/// One RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    /// `None` is the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` is the nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The elements of an array reply as text (e.g. `KEYS *`).
    pub fn as_strings(&self) -> Vec<String> {
        match self {
            Reply::Array(Some(items)) => items.iter().filter_map(Reply::as_text).collect(),
            _ => Vec::new(),
        }
    }
}

impl RedisServer {
    /// Starts a server on a free loopback port. Panics if `redis-server` is not installed: a
    /// test must fail loudly, never pass without its server.
    pub fn start() -> Result<RedisServer> {
        assert!(
            crate::has_tool("redis-server"),
            "needs `redis-server` on PATH: run `cargo xtask setup` (Debian package redis-server)"
        );
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("limiter-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut server = RedisServer { port, dir, child: None, netns: None, extra: Vec::new(), password: None };
        server.spawn()?;
        Ok(server)
    }

    /// [`Self::start`] with more `redis-server` arguments, made by `extra` from the port and the
    /// server's own directory (for `--cluster-config-file`, TLS files...), and the password
    /// [`Self::command`] sends first, if `--requirepass` is among them.
    pub fn start_with(
        extra: impl FnOnce(u16, &std::path::Path) -> Vec<String>,
        password: Option<&str>,
    ) -> Result<RedisServer> {
        assert!(
            crate::has_tool("redis-server"),
            "needs `redis-server` on PATH: run `cargo xtask setup` (Debian package redis-server)"
        );
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("limiter-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let extra = extra(port, &dir);
        let mut server =
            RedisServer { port, dir, child: None, netns: None, extra, password: password.map(str::to_owned) };
        server.spawn()?;
        Ok(server)
    }

    /// The server's own directory (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Starts a server on loopback inside `ns` (an agent there reaches it at [`Self::url`]);
    /// [`Self::command`] connects from inside `ns` too.
    pub fn start_in(ns: &crate::netns::Netns) -> Result<RedisServer> {
        assert!(
            crate::has_tool("redis-server"),
            "needs `redis-server` on PATH: run `cargo xtask setup` (Debian package redis-server)"
        );
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("limiter-redis-{}-{}-{port}", std::process::id(), ns.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let fd = File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            netns: Some((ns.name().to_owned(), fd)),
            extra: Vec::new(),
            password: None,
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit; connections drop.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing redis-server")?;
            child.wait().context("waiting for redis-server")?;
        }
        Ok(())
    }

    /// Starts the server again on the same port, empty (there is no persistence).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the server, so the child's pid is the server's.
            Some((name, _)) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", name, "redis-server"]);
                cmd
            }
            None => Command::new("redis-server"),
        };
        let child = cmd
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Reply::Status(s)) = self.command(&["PING"])
                && s == "PONG"
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("polling redis-server")?
            {
                self.child = None;
                bail!("redis-server exited at start ({status}); is port {} taken?", self.port);
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not answer PING within {START_TIMEOUT:?}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command on a fresh connection (after `AUTH` when the server has a password)
    /// and reads its reply.
    pub fn command(&self, args: &[&str]) -> Result<Reply> {
        let stream = self.connect().with_context(|| format!("connecting to redis on port {}", self.port))?;
        let auth: Vec<&str> = self.password.as_deref().map(|p| vec!["AUTH", p]).unwrap_or_default();
        send_command(stream, &auth, args)
    }

    /// A connection from the server's namespace (a socket stays in the namespace it was made in).
    fn connect(&self) -> std::io::Result<TcpStream> {
        let addr = self.addr();
        let timeout = Duration::from_secs(1);
        let Some((_, fd)) = &self.netns else {
            return TcpStream::connect_timeout(&addr, timeout);
        };
        let fd = fd.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: `fd` is an open namespace fd owned by `self`, which outlives the scope;
                // setns only changes this thread's network namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                TcpStream::connect_timeout(&addr, timeout)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("connecting thread panicked")))
        })
    }

    /// `KEYS pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Result<Vec<String>> {
        let mut keys = self.command(&["KEYS", pattern])?.as_strings();
        keys.sort();
        Ok(keys)
    }

    /// `GET key` as a number (`None` if absent).
    pub fn get_int(&self, key: &str) -> Result<Option<i64>> {
        Ok(self.command(&["GET", key])?.as_int())
    }

    /// `TTL key` in seconds (-2: no key, -1: no expiry).
    pub fn ttl(&self, key: &str) -> Result<i64> {
        self.command(&["TTL", key])?.as_int().context("TTL reply is not a number")
    }

    /// How many times `command` (lower case, e.g. `incrby`) ran since start or the last
    /// `CONFIG RESETSTAT`, from `INFO commandstats`.
    pub fn command_calls(&self, command: &str) -> Result<u64> {
        let info = self.command(&["INFO", "commandstats"])?.as_text().context("INFO reply is not text")?;
        Ok(parse_command_calls(&info, command))
    }

    /// Empties the database and zeroes the command statistics.
    pub fn reset(&self) -> Result<()> {
        self.command(&["FLUSHALL"])?;
        self.command(&["CONFIG", "RESETSTAT"])?;
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command to a plain RESP server at `addr` (a sentinel, a cluster node) on a fresh
/// connection.
pub fn command_at(addr: SocketAddr, args: &[&str]) -> Result<Reply> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connecting to redis at {addr}"))?;
    send_command(stream, &[], args)
}

/// Sends `first` (if not empty, its reply must not be an error) then `args`; `args`'s reply.
fn send_command(mut stream: TcpStream, first: &[&str], args: &[&str]) -> Result<Reply> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    for command in [first, args].into_iter().filter(|c| !c.is_empty()) {
        request.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
        for arg in command {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
    }
    stream.write_all(&request)?;
    let mut reader = BufReader::new(stream);
    if !first.is_empty()
        && let Reply::Error(e) = read_reply(&mut reader)?
    {
        bail!("{}: {e}", first[0]);
    }
    read_reply(&mut reader)
}

/// `cmdstat_incrby:calls=12,usec=...` -> 12 for `incrby`; 0 if it never ran.
pub fn parse_command_calls(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .filter_map(|line| line.trim().strip_prefix(prefix.as_str()))
        .flat_map(|fields| fields.split(','))
        .find_map(|field| field.strip_prefix("calls="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn read_line(reader: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("redis closed the connection");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn read_reply(reader: &mut impl BufRead) -> Result<Reply> {
    let line = read_line(reader)?;
    let (kind, rest) = line.split_at_checked(1).context("empty RESP line")?;
    Ok(match kind {
        "+" => Reply::Status(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(rest.parse().context("bad RESP integer")?),
        "$" => {
            let len: i64 = rest.parse().context("bad RESP bulk length")?;
            if len < 0 {
                Reply::Bulk(None)
            } else {
                let mut buf = vec![0; usize::try_from(len)? + 2];
                reader.read_exact(&mut buf)?;
                buf.truncate(buf.len() - 2);
                Reply::Bulk(Some(buf))
            }
        }
        "*" => {
            let len: i64 = rest.parse().context("bad RESP array length")?;
            if len < 0 {
                Reply::Array(None)
            } else {
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(read_reply(reader)?);
                }
                Reply::Array(Some(items))
            }
        }
        other => bail!("unexpected RESP type {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_parsing() {
        let info = "# Commandstats\r\ncmdstat_incrby:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0\r\n\
                    cmdstat_expire:calls=7,usec=9\r\n";
        assert_eq!(parse_command_calls(info, "incrby"), 12);
        assert_eq!(parse_command_calls(info, "expire"), 7);
        assert_eq!(parse_command_calls(info, "get"), 0);
    }
}

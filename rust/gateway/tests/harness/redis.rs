//! A private redis-server (Debian's) on a unix socket in a temp dir: no port to race for,
//! no persistence, gone when dropped. A test that stops it to see the fallbacks disturbs
//! no other test.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{tempdir, wait_until};

pub struct RedisServer {
    dir: tempdir::Dir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            dir: tempdir::Dir::new(),
            child: None,
        };
        server.restart();
        server
    }

    fn socket(&self) -> String {
        format!("{}/redis.sock", self.dir.path())
    }

    /// The URL engines and clients connect with.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket())
    }

    /// Start (again, empty, on the same socket) after [`RedisServer::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket", &self.socket()])
            .args([
                "--unixsocketperm",
                "600",
                "--save",
                "",
                "--appendonly",
                "no",
                // `DEBUG SLEEP`: a Redis that answers too slowly, for the slow-Redis tests.
                "--enable-debug-command",
                "local",
            ])
            .args(["--dir", self.dir.path()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.ping()),
            "redis-server accepting on its socket"
        );
    }

    /// Block the server for `seconds` (it answers nobody meanwhile), from a thread of its
    /// own; returns at once.
    pub fn stall(&self, seconds: f64) -> std::thread::JoinHandle<()> {
        let mut conn = self.conn();
        std::thread::spawn(move || {
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query(&mut conn)
                .expect("DEBUG SLEEP");
        })
    }

    fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// A plain connection, for the test's own reads and writes.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(self.socket());
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

//! CURVE key pairs made with `zbroker keygen` in a temporary directory,
//! key files beside them, and ZeroMQ sockets that use them.

use std::path::PathBuf;

/// Key pairs named `<name>.key` (and `.key.pub`) in a temporary directory.
pub struct KeyDir {
    dir: tempfile::TempDir,
}

impl KeyDir {
    /// A key pair for each of `names`.
    pub fn new(names: &[&str]) -> KeyDir {
        let keys = KeyDir {
            dir: tempfile::tempdir().expect("create a temp dir"),
        };
        for name in names {
            zbroker::auth::keygen(&keys.secret(name)).expect("keygen");
        }
        keys
    }

    /// A file in the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `name`'s secret key file.
    pub fn secret(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.key"))
    }

    /// `name`'s secret key file, as a flag's argument.
    pub fn secret_arg(&self, name: &str) -> String {
        self.secret(name)
            .to_str()
            .expect("a UTF-8 temp path")
            .to_string()
    }

    /// `name`'s public key (Z85).
    pub fn public(&self, name: &str) -> String {
        zbroker::auth::read_public_key(&self.path(&format!("{name}.key.pub")))
            .expect("read a public key")
    }

    /// Writes `text` to `file` in the directory; returns its path.
    pub fn write(&self, file: &str, text: &str) -> String {
        std::fs::write(self.path(file), text).expect("write a key file");
        self.path(file)
            .to_str()
            .expect("a UTF-8 temp path")
            .to_string()
    }

    /// A socket of `kind` with `name`'s key pair, checking that the broker
    /// at `endpoint` holds `server`'s key, connected.
    pub fn socket(
        &self,
        ctx: &zmq::Context,
        kind: zmq::SocketType,
        name: &str,
        server: &str,
        endpoint: &str,
    ) -> zmq::Socket {
        let socket = ctx.socket(kind).expect("create a socket");
        let own = zbroker::auth::read_secret_key(&self.secret(name)).expect("read a secret key");
        let decode = |key: &str| zmq::z85_decode(key).expect("a Z85 key");
        socket
            .set_curve_serverkey(&decode(&self.public(server)))
            .unwrap();
        socket.set_curve_publickey(&decode(&own.public)).unwrap();
        socket.set_curve_secretkey(&decode(&own.secret)).unwrap();
        socket
            .set_rcvtimeo(super::DEADLINE.as_millis() as i32)
            .unwrap();
        socket.set_linger(0).unwrap();
        socket.connect(endpoint).expect("connect");
        socket
    }
}

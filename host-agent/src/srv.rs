//! The DNS lookup behind `srv = "_fwnp._udp.DOMAIN"`: the SRV records of the name, in the order
//! RFC 2782 gives them ([`srv_order`]), and the addresses of each target, taken from the
//! answer's additional section when the server put them there and asked for (A and AAAA)
//! otherwise.
//!
//! It asks the servers of `/etc/resolv.conf` (or those given) as a stub resolver: UDP, again
//! over TCP when an answer comes back truncated, within the configuration's timeout. It keeps
//! no cache: the agent looks the name up at each round of connection attempts, and a cache of
//! its own would only make a moved gateway known later than the servers' TTLs say.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use domain::base::Message;
use domain::base::iana::{Class, Rcode, Rtype};
use domain::base::name::{Name, ToName};
use domain::rdata::{A, Aaaa, Srv};
use domain::resolv::StubResolver;
use domain::resolv::stub::conf::{ResolvConf, ServerConf, Transport};
use futures_util::future::join_all;

use crate::link::{SrvTarget, srv_order};

/// Where the system's resolver configuration is read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Why an SRV name gave no gateway, or a target no address.
#[derive(Debug, thiserror::Error)]
pub enum SrvError {
    /// The resolver configuration cannot be read or parsed.
    #[error("cannot read {}: {reason}", path.display())]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The name is not a domain name.
    #[error("{0:?} is not a domain name")]
    BadName(String),
    /// The name does not exist (NXDOMAIN).
    #[error("no such name (NXDOMAIN)")]
    NoSuchName,
    /// The name exists but has no SRV record.
    #[error("no SRV record")]
    NoRecords,
    /// A single target `.`: the service is decidedly not offered there (RFC 2782).
    #[error("the service is not offered there (its only target is \".\")")]
    NotOffered,
    /// The server answered with an error code other than NXDOMAIN.
    #[error("the DNS server answered {0}")]
    Answered(String),
    /// No server answered in time.
    #[error("no DNS server answered within {0:?}")]
    Timeout(Duration),
    /// The question could not be sent or its answer received.
    #[error("DNS query: {0}")]
    Network(io::Error),
    /// The answer could not be parsed.
    #[error("malformed DNS answer")]
    Malformed,
    /// A target has neither an A nor an AAAA record.
    #[error("target {0} has no address")]
    TargetWithoutAddress(String),
}

/// One SRV target and what its addresses came to.
#[derive(Debug)]
pub struct Located {
    /// The record.
    pub target: SrvTarget,
    /// Its addresses with the record's port, or why there are none.
    pub addresses: Result<Vec<SocketAddr>, SrvError>,
}

/// A stub resolver for SRV names, without a cache.
///
/// ```no_run
/// # async fn lookup() -> Result<(), fwnp_agent::srv::SrvError> {
/// use fwnp_agent::srv::SrvResolver;
/// let resolver = SrvResolver::system()?;
/// for found in resolver.locate("_fwnp._udp.example.org", &mut rand::rng()).await? {
///     println!("{}: {:?}", found.target.target, found.addresses);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SrvResolver {
    stub: StubResolver,
    timeout: Duration,
    servers: Vec<SocketAddr>,
}

impl SrvResolver {
    /// The servers and options of `/etc/resolv.conf`, read now; without that file, the local
    /// server 127.0.0.1 as the C library does.
    pub fn system() -> Result<Self, SrvError> {
        Self::from_resolv_conf(Path::new(RESOLV_CONF))
    }

    /// The servers and options (`timeout:`, `attempts:`, `use-vc`) of a file written as
    /// resolv.conf(5) says; without that file, the local server 127.0.0.1 as the C library
    /// does. A line of a kind the C library does not know either (another system's keyword,
    /// such as OpenBSD's `lookup`) is skipped with a warning naming it, as the C library skips
    /// it, so that a file every other program reads does not stop the agent; a known line that
    /// does not parse is an error naming the file.
    ///
    /// ```
    /// use fwnp_agent::srv::{SrvError, SrvResolver};
    /// let dir = std::env::temp_dir().join(format!("fwnp-srv-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join("resolv.conf");
    /// std::fs::write(&path, "nameserver 192.0.2.53\noptions timeout:2\n").unwrap();
    /// assert!(SrvResolver::from_resolv_conf(&path).is_ok());
    /// std::fs::write(&path, "nameserver\n").unwrap();
    /// assert!(matches!(
    ///     SrvResolver::from_resolv_conf(&path),
    ///     Err(SrvError::ResolvConf { .. })
    /// ));
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn from_resolv_conf(path: &Path) -> Result<Self, SrvError> {
        let mut conf = ResolvConf::new();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::from_conf(conf)),
            Err(e) => {
                return Err(SrvError::ResolvConf {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        let known = known_lines(&text, path);
        conf.parse(&mut known.as_bytes())
            .map_err(|e| SrvError::ResolvConf {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self::from_conf(conf))
    }

    /// The servers asked, in order.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// These servers (UDP, TCP after a truncated answer), each question given `timeout`.
    ///
    /// ```
    /// use fwnp_agent::srv::SrvResolver;
    /// let resolver = SrvResolver::with_servers(
    ///     &["127.0.0.1:53".parse().unwrap()],
    ///     std::time::Duration::from_secs(2),
    /// );
    /// # drop(resolver);
    /// ```
    pub fn with_servers(servers: &[SocketAddr], timeout: Duration) -> Self {
        let mut conf = ResolvConf::new();
        conf.servers = servers
            .iter()
            .map(|&addr| ServerConf::new(addr, Transport::UdpTcp))
            .collect();
        conf.options.timeout = timeout;
        Self::from_conf(conf)
    }

    fn from_conf(mut conf: ResolvConf) -> Self {
        conf.finalize();
        let timeout = conf.options.timeout;
        let servers = conf.servers.iter().map(|s| s.addr).collect();
        SrvResolver {
            stub: StubResolver::from_conf(conf),
            timeout,
            servers,
        }
    }

    /// Looks up the SRV records of `name` (fully qualified, never subject to the search
    /// domains), orders them as [`srv_order`] does and finds the addresses of each target.
    /// An error here concerns the name; a target without addresses says so in its
    /// [`Located::addresses`], and the others still serve.
    pub async fn locate<R: rand::Rng + ?Sized>(
        &self,
        name: &str,
        rng: &mut R,
    ) -> Result<Vec<Located>, SrvError> {
        let qname: Name<Vec<u8>> = Name::from_str(name.trim_end_matches('.'))
            .map_err(|_| SrvError::BadName(name.to_owned()))?;
        let answer = self
            .stub
            .query((&qname, Rtype::SRV))
            .await
            .map_err(|e| self.query_error(e))?;
        let rcode = answer.header().rcode();
        if rcode == Rcode::NXDOMAIN {
            return Err(SrvError::NoSuchName);
        }
        if rcode != Rcode::NOERROR {
            return Err(SrvError::Answered(rcode.to_string()));
        }
        // The records of the name the answer ends at after its CNAMEs, if any.
        let owner = answer.canonical_name().ok_or(SrvError::Malformed)?;
        let mut targets = Vec::new();
        let records = answer.answer().map_err(|_| SrvError::Malformed)?;
        for record in records.limit_to_in::<Srv<_>>() {
            let record = record.map_err(|_| SrvError::Malformed)?;
            if !record.owner().name_eq(&owner) {
                continue;
            }
            let srv = record.data();
            targets.push(SrvTarget {
                priority: srv.priority(),
                weight: srv.weight(),
                port: srv.port(),
                target: srv.target().to_string().trim_end_matches('.').to_owned(),
            });
        }
        if targets.is_empty() {
            return Err(SrvError::NoRecords);
        }
        let ordered = srv_order(targets, rng);
        if ordered.is_empty() {
            return Err(SrvError::NotOffered);
        }
        let additional = additional_addresses(answer.for_slice())?;
        let additional = &additional;
        // The targets the answer gave no address for are looked up all at once: one after
        // another, a name whose targets' questions go unanswered would hold the round of
        // connection attempts for a timeout per target, while the host's leases run out.
        let located = ordered.into_iter().map(|target| async move {
            let given: Vec<IpAddr> = additional
                .iter()
                .filter(|(owner, _)| owner.eq_ignore_ascii_case(&target.target))
                .map(|&(_, addr)| addr)
                .collect();
            let addresses = if given.is_empty() {
                self.addresses_of(&target.target).await
            } else {
                Ok(given)
            };
            let addresses = addresses.map(|list| {
                list.into_iter()
                    .map(|ip| SocketAddr::new(ip, target.port))
                    .collect()
            });
            Located { target, addresses }
        });
        Ok(join_all(located).await)
    }

    /// The A and AAAA records of a target the answer gave no address for.
    async fn addresses_of(&self, target: &str) -> Result<Vec<IpAddr>, SrvError> {
        let name: Name<Vec<u8>> =
            Name::from_str(target).map_err(|_| SrvError::BadName(target.to_owned()))?;
        let found = self
            .stub
            .lookup_host(&name)
            .await
            .map_err(|e| self.query_error(e))?;
        let addresses: Vec<IpAddr> = found.iter().collect();
        if addresses.is_empty() {
            return Err(SrvError::TargetWithoutAddress(target.to_owned()));
        }
        Ok(addresses)
    }

    fn query_error(&self, e: io::Error) -> SrvError {
        if e.kind() == io::ErrorKind::TimedOut {
            SrvError::Timeout(self.timeout)
        } else {
            SrvError::Network(e)
        }
    }
}

/// The A and AAAA records of an answer's additional section, by owner (without the final dot).
fn additional_addresses(answer: &Message<[u8]>) -> Result<Vec<(String, IpAddr)>, SrvError> {
    let mut found = Vec::new();
    for record in answer.additional().map_err(|_| SrvError::Malformed)? {
        // A record this resolver cannot parse is of no use to it, and the others still are.
        let Ok(record) = record else { continue };
        if record.class() != Class::IN {
            continue;
        }
        let (owner, addr) = if let Ok(Some(a)) = record.to_record::<A>() {
            (a.owner().to_string(), IpAddr::from(a.data().addr()))
        } else if let Ok(Some(aaaa)) = record.to_record::<Aaaa>() {
            (aaaa.owner().to_string(), IpAddr::from(aaaa.data().addr()))
        } else {
            continue;
        };
        found.push((owner.trim_end_matches('.').to_owned(), addr));
    }
    Ok(found)
}

/// The lines of a resolv.conf whose keyword resolv.conf(5) defines (and comments, blank lines);
/// the others are skipped with a warning, as the C library skips them.
fn known_lines(text: &str, path: &Path) -> String {
    const KEYWORDS: &[&str] = &["nameserver", "domain", "search", "sortlist", "options"];
    let mut known = String::with_capacity(text.len());
    for (number, line) in text.lines().enumerate() {
        let keyword = line.split_whitespace().next();
        match keyword {
            Some(word) if !word.starts_with(['#', ';']) && !KEYWORDS.contains(&word) => {
                tracing::warn!(
                    file = %path.display(),
                    line = number + 1,
                    keyword = word,
                    "resolver configuration line of an unknown kind skipped"
                );
            }
            _ => {
                known.push_str(line);
                known.push('\n');
            }
        }
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolv_conf(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, text).expect("write resolv.conf");
        (dir, path)
    }

    #[test]
    fn the_servers_and_the_timeout_of_resolv_conf_are_used() {
        let (_dir, path) = resolv_conf(
            "# comment\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n\
             search example.org\noptions edns0 trust-ad timeout:3\n",
        );
        let resolver = SrvResolver::from_resolv_conf(&path).expect("parsed");
        assert_eq!(
            resolver.servers(),
            [
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
        assert_eq!(resolver.timeout, Duration::from_secs(3));
    }

    #[test]
    fn without_resolv_conf_the_local_server_is_asked() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let resolver = SrvResolver::from_resolv_conf(&dir.path().join("missing")).expect("default");
        assert_eq!(resolver.servers(), ["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(resolver.timeout, Duration::from_secs(5));
    }

    #[test]
    fn a_line_that_cannot_be_read_is_an_error_naming_the_file() {
        for text in ["nameserver\n", "nameserver 192.0.2.1 extra\n"] {
            let (_dir, path) = resolv_conf(text);
            match SrvResolver::from_resolv_conf(&path) {
                Err(SrvError::ResolvConf { path: named, .. }) => assert_eq!(named, path),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_line_of_an_unknown_kind_is_skipped_as_the_c_library_skips_it() {
        let (_dir, path) = resolv_conf(
            "lookup file bind\nnameserver 192.0.2.53\n# comment\noptions edns0 trust-ad\n",
        );
        let resolver = SrvResolver::from_resolv_conf(&path).expect("parsed");
        assert_eq!(resolver.servers(), ["192.0.2.53:53".parse().unwrap()]);
    }
}

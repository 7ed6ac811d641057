//! The sandbox's view of the network: the generated `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname`, and the loopback interface of a fresh network namespace.

use std::io;

use crate::spec::Network;
use crate::sys;

/// `/etc/hosts` as Docker writes it: the localhost entries, the sandbox's own hostname, then
/// the extra `IP NAME...` lines.
pub fn hosts_file(hostname: &str, extra_hosts: &[String]) -> String {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         ff00::0\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    if !hostname.is_empty() {
        hosts.push_str("127.0.1.1\t");
        hosts.push_str(hostname);
        hosts.push('\n');
    }
    for line in extra_hosts {
        hosts.push_str(line.trim());
        hosts.push('\n');
    }
    hosts
}

/// `/etc/resolv.conf`: the host's own with the host network; empty without a network, where
/// no name server is reachable anyway.
pub fn resolv_conf(network: Network, host_resolv_conf: &str) -> String {
    match network {
        Network::Host => host_resolv_conf.to_string(),
        Network::None => String::new(),
    }
}

/// `/etc/hostname`.
pub fn hostname_file(hostname: &str) -> String {
    format!("{hostname}\n")
}

/// Brings the loopback interface of the current (fresh) network namespace up.
pub fn loopback_up() -> io::Result<()> {
    sys::set_interface_up("lo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_has_localhost_hostname_and_extras() {
        let hosts = hosts_file("builder", &["10.0.0.5 registry.local".to_string()]);
        let lines: Vec<&str> = hosts.lines().collect();
        assert_eq!(lines[0], "127.0.0.1\tlocalhost");
        assert_eq!(lines[1], "::1\tlocalhost ip6-localhost ip6-loopback");
        assert!(lines.contains(&"127.0.1.1\tbuilder"));
        assert_eq!(lines.last(), Some(&"10.0.0.5 registry.local"));
    }

    #[test]
    fn resolv_conf_is_empty_without_network() {
        let host = "nameserver 10.0.0.1\n";
        assert_eq!(resolv_conf(Network::None, host), "");
        assert_eq!(resolv_conf(Network::Host, host), host);
    }
}

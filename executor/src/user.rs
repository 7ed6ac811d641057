//! The user a process runs as, resolved like Docker does: with the root filesystem's own
//! `/etc/passwd` and `/etc/group`, never the host's NSS (moby/sys `user.GetExecUser`).
//!
//! `user` is `uid[:gid]` or `name[:group]`, each part a name or a number; numbers need no
//! entry in the files. The supplementary groups are the primary group (moby's `getUser` puts
//! it first in `AdditionalGids`) and, only when no group is given, the user's `/etc/group`
//! memberships ("supplementary group ids only make sense in the implicit form").

use thiserror::Error;

/// The identity the process gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids, the primary group first.
    pub supplementary_gids: Vec<u32>,
    /// Home directory from `/etc/passwd`, `/` without an entry.
    pub home: String,
}

/// Why a user could not be resolved. These are the Dockerfile author's to fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UserError {
    /// A user name with no passwd entry.
    #[error("unable to find user {name}: no matching entries in passwd file")]
    UnknownUser {
        /// The name asked for.
        name: String,
    },
    /// A group name with no group entry.
    #[error("unable to find group {name}: no matching entries in group file")]
    UnknownGroup {
        /// The name asked for.
        name: String,
    },
    /// A numeric id out of range.
    #[error("invalid user or group id {id}: ids are 0 to 2147483647")]
    InvalidId {
        /// The id as written.
        id: String,
    },
}

/// One line of `/etc/passwd`.
#[derive(Debug)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One line of `/etc/group`.
#[derive(Debug)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        Some(PasswdEntry {
            name: fields.first().copied()?,
            uid: fields.get(2)?.parse().ok()?,
            gid: fields.get(3)?.parse().ok()?,
            home: fields.get(5).copied().unwrap_or(""),
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        Some(GroupEntry {
            name: fields.first().copied()?,
            gid: fields.get(2)?.parse().ok()?,
            members: fields
                .get(3)
                .map(|members| members.split(',').filter(|m| !m.is_empty()).collect())
                .unwrap_or_default(),
        })
    })
}

/// A numeric id, if `text` is one. Ids above `i32::MAX` are refused as runc does.
fn numeric_id(text: &str) -> Result<Option<u32>, UserError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match text.parse::<u32>() {
        Ok(id) if id <= i32::MAX as u32 => Ok(Some(id)),
        _ => Err(UserError::InvalidId {
            id: text.to_string(),
        }),
    }
}

/// Resolves `user` (empty: root) against the contents of the root's `/etc/passwd` and
/// `/etc/group` (`None` when the file is missing).
pub fn resolve(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ExecUser, UserError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let number = numeric_id(user_part)?;
    let entry = passwd_entries(passwd.unwrap_or("")).find(|entry| match number {
        Some(uid) => entry.uid == uid,
        None => entry.name == user_part,
    });
    let mut exec_user = match (&entry, number) {
        (Some(entry), _) => ExecUser {
            uid: entry.uid,
            gid: entry.gid,
            supplementary_gids: Vec::new(),
            home: if entry.home.is_empty() {
                "/"
            } else {
                entry.home
            }
            .to_string(),
        },
        (None, Some(uid)) => ExecUser {
            uid,
            gid: 0,
            supplementary_gids: Vec::new(),
            home: "/".to_string(),
        },
        (None, None) => {
            return Err(UserError::UnknownUser {
                name: user_part.to_string(),
            });
        }
    };

    match group_part {
        Some(group_part) if !group_part.is_empty() => {
            exec_user.gid = match numeric_id(group_part)? {
                Some(gid) => gid,
                None => group_entries(group.unwrap_or(""))
                    .find(|entry| entry.name == group_part)
                    .map(|entry| entry.gid)
                    .ok_or_else(|| UserError::UnknownGroup {
                        name: group_part.to_string(),
                    })?,
            };
        }
        _ => {
            if let Some(entry) = &entry {
                for group_entry in group_entries(group.unwrap_or("")) {
                    if group_entry.members.contains(&entry.name)
                        && !exec_user.supplementary_gids.contains(&group_entry.gid)
                    {
                        exec_user.supplementary_gids.push(group_entry.gid);
                    }
                }
            }
        }
    }
    let mut gids = vec![exec_user.gid];
    for gid in exec_user.supplementary_gids {
        if !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    exec_user.supplementary_gids = gids;
    Ok(exec_user)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
# a comment
alice:x:1000:1000:Alice:/home/alice:/bin/sh
nobody:x:65534:65534:nobody:/home:/bin/false
nohome:x:1001:1001::
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
alice:x:1000:
wheel:x:10:alice,bob
audio:x:29:bob,alice
nogroup:x:65534:
";

    fn resolve_in_image(user: &str) -> Result<ExecUser, UserError> {
        resolve(user, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn empty_user_is_root_with_its_home() {
        let user = resolve_in_image("").unwrap();
        assert_eq!((user.uid, user.gid, user.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn name_gets_primary_and_supplementary_groups() {
        assert_eq!(
            resolve_in_image("alice").unwrap(),
            ExecUser {
                uid: 1000,
                gid: 1000,
                supplementary_gids: vec![1000, 10, 29],
                home: "/home/alice".to_string(),
            }
        );
    }

    #[test]
    fn numeric_uid_with_an_entry_uses_the_entry() {
        let user = resolve_in_image("65534").unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (65534, 65534, "/home")
        );
    }

    #[test]
    fn numeric_ids_without_entries_are_allowed() {
        assert_eq!(
            resolve_in_image("4242:4343").unwrap(),
            ExecUser {
                uid: 4242,
                gid: 4343,
                supplementary_gids: vec![4343],
                home: "/".to_string(),
            }
        );
        let user = resolve("1234", None, None).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.supplementary_gids),
            (1234, 0, vec![0])
        );
    }

    #[test]
    fn explicit_group_drops_supplementary_groups() {
        let user = resolve_in_image("alice:wheel").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 10));
        assert_eq!(user.supplementary_gids, [10]);
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve_in_image("mallory").unwrap_err().to_string(),
            "unable to find user mallory: no matching entries in passwd file"
        );
        assert_eq!(
            resolve_in_image("alice:staff").unwrap_err().to_string(),
            "unable to find group staff: no matching entries in group file"
        );
        assert!(matches!(
            resolve("nobody", None, None),
            Err(UserError::UnknownUser { .. })
        ));
    }

    #[test]
    fn ids_beyond_i32_are_refused() {
        assert!(matches!(
            resolve_in_image("4294967295"),
            Err(UserError::InvalidId { .. })
        ));
    }

    #[test]
    fn empty_home_falls_back_to_root_dir() {
        assert_eq!(resolve_in_image("nohome").unwrap().home, "/");
    }
}

//! The `--workspace` value as the user typed it: a leading `~` that no shell expanded.

use crate::launch::command::quote;

/// Why `value` cannot be a workspace when it starts with `~` (a shell expands `~` only at the
/// start of a word, so `--workspace=~/x` arrives as typed), with the flag that means what the
/// user most likely meant. dglrun does not expand it itself: the agents' users and homes are
/// not known here, and a literal `~` would become a directory named `~` under every root.
pub fn unexpanded_tilde(value: &str) -> Option<String> {
    if !value.starts_with('~') {
        return None;
    }
    let rest = value
        .strip_prefix("~/")
        .map(|r| r.trim_start_matches('/'))
        .filter(|r| !r.is_empty())
        .unwrap_or(".");
    Some(format!(
        "--workspace {}: the `~` was not expanded (a shell expands it only at the start of a \
         word, not after `--workspace=`), and each agent would make a directory named `~` \
         under its root. Give the path relative to the agent's --root (its user's home by \
         default): `--workspace {}`, or an absolute path",
        quote(value),
        quote(rest)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leading_tilde_is_explained_with_the_flag_to_use() {
        let msg = unexpanded_tilde("~/dglrun/x").unwrap();
        assert!(
            msg.starts_with("--workspace '~/dglrun/x': the `~` was not expanded"),
            "{msg}"
        );
        assert!(msg.contains("`--workspace dglrun/x`"), "{msg}");
        assert!(unexpanded_tilde("~").unwrap().contains("`--workspace .`"));
        assert!(unexpanded_tilde("~bob/x").is_some());
        assert_eq!(unexpanded_tilde("/home/u/ws"), None);
        assert_eq!(unexpanded_tilde("ws/~x"), None);
    }
}

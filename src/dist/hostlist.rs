//! Slurm's hostlist syntax (`SLURM_JOB_NODELIST`): comma-separated host names, each with
//! optional bracketed ranges, e.g. `gpu[001-004,007],cpu12` or `rack[1-2]-node[01-02]`.
//! Zero padding is kept (`gpu[001-003]` -> `gpu001`, `gpu002`, `gpu003`).

use super::DistError;

/// Upper bound on the number of names one expression may expand to (a typo such as
/// `node[1-99999999]` should be an error, not an allocation of gigabytes).
const MAX_HOSTS: usize = 1 << 20;

/// Expands a Slurm hostlist into host names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, DistError> {
    let bad = |why: &str| DistError::Hostlist {
        list: list.to_string(),
        reason: why.to_string(),
    };
    let mut hosts = Vec::new();
    for item in split_top_level(list).map_err(|e| bad(&e))? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let names = expand_one(item).map_err(|e| bad(&e))?;
        hosts.extend(names);
        if hosts.len() > MAX_HOSTS {
            return Err(bad("expands to more than a million host names"));
        }
    }
    if hosts.is_empty() {
        return Err(bad("names no host"));
    }
    Ok(hosts)
}

/// The first host of a Slurm hostlist (where rank 0 runs).
pub fn first_host(list: &str) -> Result<String, DistError> {
    // The first host is the first name of the first item; expanding it alone is enough.
    let bad = |why: &str| DistError::Hostlist {
        list: list.to_string(),
        reason: why.to_string(),
    };
    let items = split_top_level(list).map_err(|e| bad(&e))?;
    let first = items
        .iter()
        .map(|s| s.trim())
        .find(|s| !s.is_empty())
        .ok_or_else(|| bad("names no host"))?;
    let names = expand_one(first).map_err(|e| bad(&e))?;
    names.into_iter().next().ok_or_else(|| bad("names no host"))
}

/// Splits at commas that are outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, ch) in list.char_indices() {
        match ch {
            '[' => {
                if depth > 0 {
                    return Err(format!("nested '[' at byte {i}"));
                }
                depth = 1;
            }
            ']' => {
                if depth == 0 {
                    return Err(format!("']' without '[' at byte {i}"));
                }
                depth = 0;
            }
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a '[' is never closed".to_string());
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Expands one item such as `rack[1-2]-node[01,03]` (every bracket group multiplies).
fn expand_one(item: &str) -> Result<Vec<String>, String> {
    let Some(open) = item.find('[') else {
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|k| open + k)
        .ok_or_else(|| format!("'[' in {item:?} is never closed"))?;
    let prefix = &item[..open];
    let body = &item[open + 1..close];
    let rest = expand_one(&item[close + 1..])?;
    let mut out = Vec::new();
    for part in body.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty range in [{body}]"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!(
                "{part:?} in [{body}] is not a number or a range a-b"
            ));
        }
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("{s:?} in [{body}] is too large"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("range {part:?} in [{body}] runs backwards"));
        }
        if (b - a) as usize >= MAX_HOSTS {
            return Err(format!("range {part:?} is larger than a million hosts"));
        }
        let width = lo.len();
        for n in a..=b {
            for suffix in &rest {
                out.push(format!("{prefix}{n:0width$}{suffix}"));
                if out.len() > MAX_HOSTS {
                    return Err("expands to more than a million host names".to_string());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_table() {
        let table: &[(&str, &[&str])] = &[
            ("node1", &["node1"]),
            ("a,b,c", &["a", "b", "c"]),
            (
                "gpu[001-004,007],cpu12",
                &["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "cpu12"],
            ),
            ("n[8-11]", &["n8", "n9", "n10", "n11"]),
            ("n[08-11]", &["n08", "n09", "n10", "n11"]),
            ("n[3]", &["n3"]),
            (
                "rack[1-2]-node[01,03]",
                &[
                    "rack1-node01",
                    "rack1-node03",
                    "rack2-node01",
                    "rack2-node03",
                ],
            ),
            ("x[1-2].cluster,y", &["x1.cluster", "x2.cluster", "y"]),
            ("nid[00010-00011]", &["nid00010", "nid00011"]),
            (" a , b ", &["a", "b"]),
        ];
        for (list, want) in table {
            let got = expand(list).unwrap_or_else(|e| panic!("{list}: {e}"));
            assert_eq!(got, *want, "{list}");
            assert_eq!(first_host(list).unwrap(), want[0], "{list}");
        }
    }

    #[test]
    fn malformed_lists_are_errors_naming_the_list() {
        for list in [
            "",
            "gpu[001-004",
            "gpu]1[",
            "gpu[4-1]",
            "gpu[a-b]",
            "gpu[1-]",
            "gpu[]",
            "gpu[[1]]",
            "n[1-99999999]",
        ] {
            let err = expand(list).expect_err(list).to_string();
            assert!(err.contains(&format!("{list:?}")), "{list}: {err}");
        }
    }
}

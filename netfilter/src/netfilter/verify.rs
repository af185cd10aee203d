//! Verification: the table's structure as the kernel reports it (chains, rules, sets,
//! counters) compared with what the layout asks for, so that a rule replaced or a policy
//! changed by someone else counts as damage.

use super::*;

/// Whether a rule's expressions as the kernel reports them are the ones we sent: same
/// expressions in the same order, and every attribute we sent present with the same value
/// (the kernel adds attributes of its own, such as a bitwise operation or lookup flags).
pub(crate) fn expressions_match(sent: &[u8], reported: &[u8]) -> bool {
    let sent: Vec<&[u8]> = Attrs::new(sent)
        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
        .map(|(_, d)| d)
        .collect();
    let reported: Vec<&[u8]> = Attrs::new(reported)
        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
        .map(|(_, d)| d)
        .collect();
    if sent.len() != reported.len() {
        return false;
    }
    sent.iter().zip(&reported).all(|(s, r)| {
        let name = Attrs::new(s).find(NFTA_EXPR_NAME).map(c_string);
        if name != Attrs::new(r).find(NFTA_EXPR_NAME).map(c_string) {
            return false;
        }
        let s_data = Attrs::new(s).find(NFTA_EXPR_DATA).unwrap_or(&[]);
        let r_data = Attrs::new(r).find(NFTA_EXPR_DATA).unwrap_or(&[]);
        // The lookup's set id only names a set within the creating transaction.
        let write_only = |t: u16| name.as_deref() == Some("lookup") && t == 4;
        attrs_subset(s_data, r_data, &write_only, 0)
    })
}

pub(super) fn attrs_subset(
    sent: &[u8],
    reported: &[u8],
    write_only: &dyn Fn(u16) -> bool,
    depth: usize,
) -> bool {
    Attrs::new(sent).all(|(t, value)| {
        if depth == 0 && write_only(t) {
            return true;
        }
        let Some(other) = Attrs::new(reported).find(t) else {
            return false;
        };
        // Equal bytes, or (for a nest) the same subset relation one level down.
        other == value
            || (depth < 3
                && Attrs::new(value).count() > 0
                && attrs_subset(value, other, &|_| false, depth + 1))
    })
}

pub(super) fn expected_structure(layout: &Layout) -> Result<Expected, Error> {
    struct Null(u32);
    impl Sequencer for Null {
        fn next(&mut self, _: Op) -> u32 {
            self.0 += 1;
            self.0
        }
    }
    let mut scratch = Builder::new();
    write_table(layout, &mut scratch, &mut Null(0), 0)
}

/// Compares structures regardless of order; the error names the first difference.
pub(super) fn compare_structure(expected: &Expected, actual: &Expected) -> Result<(), String> {
    let mut e_chains = expected.chains.clone();
    let mut a_chains = actual.chains.clone();
    e_chains.sort();
    a_chains.sort();
    if e_chains != a_chains {
        return Err(format!(
            "chains (with rule counts) {a_chains:?}, expected {e_chains:?}"
        ));
    }
    let mut e_sets = expected.sets.clone();
    let mut a_sets = actual.sets.clone();
    e_sets.sort_unstable();
    a_sets.sort_unstable();
    if e_sets != a_sets {
        return Err(format!("sets {a_sets:?}, expected {e_sets:?}"));
    }
    let mut e_props = expected.chain_props.clone();
    let mut a_props = actual.chain_props.clone();
    e_props.sort_by(|a, b| a.0.cmp(&b.0));
    a_props.sort_by(|a, b| a.0.cmp(&b.0));
    if e_props != a_props {
        return Err(format!("base chains {a_props:?}, expected {e_props:?}"));
    }
    let mut e_set_props = expected.set_props.clone();
    let mut a_set_props = actual.set_props.clone();
    e_set_props.sort_unstable();
    a_set_props.sort_unstable();
    let sets_match = e_set_props.len() == a_set_props.len()
        && e_set_props
            .iter()
            .zip(&a_set_props)
            .all(|(e, a)| e.0 == a.0 && a.1 & e.1 == e.1 && e.2 == a.2);
    if !sets_match {
        return Err(format!(
            "sets (flags, key length) {a_set_props:?}, expected {e_set_props:?}"
        ));
    }
    for (chain, _) in &expected.chains {
        let wanted: Vec<&Vec<u8>> = expected
            .rules
            .iter()
            .filter(|(c, _)| c == chain)
            .map(|(_, r)| r)
            .collect();
        let found: Vec<&Vec<u8>> = actual
            .rules
            .iter()
            .filter(|(c, _)| c == chain)
            .map(|(_, r)| r)
            .collect();
        for (position, (w, f)) in wanted.iter().zip(&found).enumerate() {
            if !expressions_match(w, f) {
                let names = |bytes: &[u8]| -> Vec<String> {
                    Attrs::new(bytes)
                        .filter_map(|(_, e)| Attrs::new(e).find(NFTA_EXPR_NAME).map(c_string))
                        .collect()
                };
                return Err(format!(
                    "rule {position} of chain {chain} differs from the layout: {:?}, expected {:?}",
                    names(f),
                    names(w)
                ));
            }
        }
    }
    let mut e_counters = expected.counters.clone();
    let mut a_counters = actual.counters.clone();
    e_counters.sort_unstable();
    a_counters.sort_unstable();
    if e_counters != a_counters {
        return Err(format!("counters {a_counters:?}, expected {e_counters:?}"));
    }
    Ok(())
}

impl Netfilter {
    /// Reads our table back and compares its chains (with rule counts), sets and counters.
    pub(super) fn verify(&mut self, layout: &Layout, expected: &Expected) -> Result<(), Error> {
        let actual = self.read_structure(layout.table())?;
        let Some(actual) = actual else {
            return Err(Error::VerifyFailed(format!(
                "table inet {} is missing after apply",
                layout.table()
            )));
        };
        compare_structure(expected, &actual).map_err(Error::VerifyFailed)
    }

    /// The structure of our table as the kernel reports it, or `None` if it does not exist.
    pub(super) fn read_structure(&mut self, table: &str) -> Result<Option<Expected>, Error> {
        if !self.table_exists(table)? {
            return Ok(None);
        }
        let mut chains: Vec<(String, usize)> = Vec::new();
        let mut chain_props = Vec::new();
        let mut rules = Vec::new();
        let mut set_props = Vec::new();
        for datagram in self.dump_ok(NFT_MSG_GETCHAIN, table, NFTA_CHAIN_TABLE)? {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs
                    .clone()
                    .find(NFTA_CHAIN_TABLE)
                    .map(c_string)
                    .as_deref()
                    != Some(table)
                {
                    continue;
                }
                if let Some(name) = attrs.clone().find(NFTA_CHAIN_NAME) {
                    let hook = attrs.clone().find(NFTA_CHAIN_HOOK);
                    let props = hook.map(|hook| ChainProps {
                        hooknum: Attrs::new(hook)
                            .find(NFTA_HOOK_HOOKNUM)
                            .and_then(be_u32)
                            .unwrap_or(u32::MAX),
                        priority: Attrs::new(hook)
                            .find(NFTA_HOOK_PRIORITY)
                            .and_then(be_u32)
                            .unwrap_or(u32::MAX),
                        policy: attrs
                            .clone()
                            .find(NFTA_CHAIN_POLICY)
                            .and_then(be_u32)
                            .unwrap_or(u32::MAX),
                    });
                    chains.push((c_string(name), 0));
                    chain_props.push((c_string(name), props));
                }
            }
        }
        for datagram in self.dump_ok(NFT_MSG_GETRULE, table, NFTA_RULE_TABLE)? {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs.clone().find(NFTA_RULE_TABLE).map(c_string).as_deref() != Some(table) {
                    continue;
                }
                let chain = attrs
                    .clone()
                    .find(NFTA_RULE_CHAIN)
                    .map(c_string)
                    .unwrap_or_default();
                rules.push((
                    chain.clone(),
                    attrs.find(NFTA_RULE_EXPRESSIONS).unwrap_or(&[]).to_vec(),
                ));
                match chains.iter_mut().find(|(name, _)| *name == chain) {
                    Some(entry) => entry.1 += 1,
                    None => chains.push((chain, 1)),
                }
            }
        }
        let mut sets = Vec::new();
        for datagram in self.dump_ok(NFT_MSG_GETSET, table, NFTA_SET_TABLE)? {
            for m in messages(&datagram) {
                if m.msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSET {
                    continue;
                }
                let attrs = m.nft_attrs();
                if attrs.clone().find(NFTA_SET_TABLE).map(c_string).as_deref() != Some(table) {
                    continue;
                }
                if let Some(set) = attrs.clone().find(NFTA_SET_NAME).map(c_string) {
                    // Names we do not know cannot be ours: reported as a mismatch below.
                    let name = SetId::from_name(&set)
                        .map(|s| s.name())
                        .unwrap_or("(foreign set)");
                    sets.push(name);
                    let flags = attrs
                        .clone()
                        .find(NFTA_SET_FLAGS)
                        .and_then(be_u32)
                        .unwrap_or(0);
                    let key_len = attrs.find(NFTA_SET_KEY_LEN).and_then(be_u32).unwrap_or(0);
                    set_props.push((name, flags, key_len));
                }
            }
        }
        let counters = self
            .counters_in(table)?
            .into_iter()
            .map(|c| {
                crate::layout::ALL_COUNTER_NAMES
                    .iter()
                    .copied()
                    .find(|n| *n == c.name)
                    .unwrap_or("(foreign counter)")
            })
            .collect();
        Ok(Some(Expected {
            chains,
            sets,
            counters,
            chain_props,
            rules,
            set_props,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Expression<'a> = (&'a str, &'a [(u16, &'a [u8])]);

    fn expression_list(exprs: &[Expression<'_>]) -> Vec<u8> {
        let mut b = Builder::new();
        for (name, attrs) in exprs {
            let elem = b.nest_start(NFTA_LIST_ELEM);
            b.put_str(NFTA_EXPR_NAME, name);
            let data = b.nest_start(NFTA_EXPR_DATA);
            for (t, v) in *attrs {
                b.put(*t, v);
            }
            b.nest_end(data);
            b.nest_end(elem);
        }
        b.into_bytes()
    }

    #[test]
    fn read_back_rules_match_what_was_sent() {
        let sent = expression_list(&[
            ("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1])]),
            ("lookup", &[(1, b"lease4\0"), (4, &[0, 0, 0, 1])]),
        ]);
        // The kernel adds attributes of its own and drops the lookup's set id.
        let reported = expression_list(&[
            (
                "payload",
                &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1]), (6, &[0, 0, 0, 0])],
            ),
            ("lookup", &[(1, b"lease4\0"), (5, &[0, 0, 0, 0])]),
        ]);
        assert!(expressions_match(&sent, &reported));
        // A value changed, an expression replaced, an expression missing: all differ.
        let changed = expression_list(&[
            ("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 2])]),
            ("lookup", &[(1, b"lease4\0")]),
        ]);
        assert!(!expressions_match(&sent, &changed));
        let replaced = expression_list(&[
            ("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1])]),
            ("immediate", &[]),
        ]);
        assert!(!expressions_match(&sent, &replaced));
        let shorter = expression_list(&[("payload", &[(1, &[0, 0, 0, 1]), (2, &[0, 0, 0, 1])])]);
        assert!(!expressions_match(&sent, &shorter));
    }

    #[test]
    fn structure_comparison_ignores_order() {
        let a = Expected {
            chains: vec![("a".into(), 1), ("b".into(), 2)],
            sets: vec!["lease4", "range4"],
            counters: vec!["x", "y"],
            ..Expected::empty()
        };
        let mut b = a.clone();
        b.chains.reverse();
        b.sets.reverse();
        assert!(compare_structure(&a, &b).is_ok());
        b.chains[0].1 = 0;
        assert!(compare_structure(&a, &b).is_err());
    }
}

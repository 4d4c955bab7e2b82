//! The `split` step: named subsets (groups) of an input data set's cases,
//! by explicit case ids or by counts with a seeded shuffle. Items are reused
//! as they are (no copies): the output lists the input's item objects and
//! adds the groups, which later steps select as `prep@split.train`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::*;

/// The `split` step kind.
pub struct Split;

/// Parameters of `split`: exactly one of `counts` and `cases`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    /// Group name → number of cases, filled in group-name order (params are
    /// canonicalised with sorted keys) from a seeded shuffle of the sorted ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<serde_json::Map<String, serde_json::Value>>,
    /// Group name → explicit case ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cases: Option<BTreeMap<String, Vec<String>>>,
    /// Shuffle seed for `counts`.
    #[serde(default)]
    pub seed: u64,
}

/// Parsed counts, in the user's order.
fn counts_of(
    m: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(String, usize)>, ParamError> {
    m.iter()
        .map(|(k, v)| {
            v.as_u64().map(|n| (k.clone(), n as usize)).ok_or_else(|| {
                ParamError::new(
                    format!("counts.{k}"),
                    format!("expected a count ≥ 0, found {v}"),
                )
            })
        })
        .collect()
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fisher–Yates with SplitMix64: stable across crate versions.
fn shuffle(ids: &mut [String], seed: u64) {
    let mut state = mix(seed);
    for i in (1..ids.len()).rev() {
        state = mix(state);
        let j = (state % (i as u64 + 1)) as usize;
        ids.swap(i, j);
    }
}

/// Groups for `ids` (sorted) under `p`; errors name the group or case.
pub fn make_groups(
    p: &SplitParams,
    ids: &[String],
) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut groups = BTreeMap::new();
    match (&p.counts, &p.cases) {
        (Some(c), None) => {
            let mut counts = counts_of(c).map_err(|e| e.message)?;
            // Name order, whatever order the map arrives in (the engine's
            // canonical params sort keys), so YAML key order never matters.
            counts.sort();
            let total: usize = counts.iter().map(|(_, n)| n).sum();
            if total > ids.len() {
                return Err(format!(
                    "counts ask for {total} cases ({}) but the input has {}",
                    counts
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    ids.len()
                ));
            }
            let mut order = ids.to_vec();
            shuffle(&mut order, p.seed);
            let mut at = 0;
            for (name, n) in counts {
                let mut g = order[at..at + n].to_vec();
                g.sort();
                groups.insert(name, g);
                at += n;
            }
        }
        (None, Some(cases)) => {
            let known: BTreeSet<&String> = ids.iter().collect();
            let mut seen: BTreeMap<&String, &String> = BTreeMap::new();
            for (name, list) in cases {
                for id in list {
                    if !known.contains(id) {
                        return Err(format!("cases.{name}: case `{id}` is not in the input"));
                    }
                    if let Some(prev) = seen.insert(id, name) {
                        return Err(format!("case `{id}` is in both `{prev}` and `{name}`"));
                    }
                }
                let mut g = list.clone();
                g.sort();
                groups.insert(name.clone(), g);
            }
        }
        _ => return Err("give exactly one of `counts` and `cases`".into()),
    }
    Ok(groups)
}

impl StepKind for Split {
    fn name(&self) -> &'static str {
        "split"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Named groups of the input's cases (e.g. train/val/test), by `counts` \
         (filled in group-name order from a shuffle of the case ids seeded by `seed`) or by \
         explicit `cases`. The cases themselves are reused, not copied; select \
         a group downstream as `step@split.group`."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[InputSpec {
            name: "input",
            arity: Arity::One,
        }]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "counts",
                "mapping group → number of cases, e.g. {train: 10, val: 3, test: 3}",
            ),
            (
                "cases",
                "mapping group → list of case ids (instead of counts)",
            ),
            ("seed", "integer, default 0: shuffle seed for counts"),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        let v = canonical_params::<SplitParams>(params)?;
        let p: SplitParams = parse_params(&v)?;
        match (&p.counts, &p.cases) {
            (Some(c), None) => {
                counts_of(c)?;
            }
            (None, Some(_)) => {}
            _ => {
                return Err(ParamError::new(
                    "",
                    "give exactly one of `counts` and `cases`",
                ))
            }
        }
        Ok(v)
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: SplitParams = parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let input = ctx.input("input")?;
        let ids: Vec<String> = input.items.keys().cloned().collect();
        let groups = make_groups(&p, &ids)
            .map_err(|m| StepError::Params(format!("{}: {m}", input.reference)))?;
        let mut items = BTreeMap::new();
        for id in &ids {
            let hash = input.manifest.items.get(id).ok_or_else(|| {
                StepError::Input(format!(
                    "{}: case `{id}` has no object in its manifest",
                    input.reference
                ))
            })?;
            items.insert(id.clone(), ItemSource::Existing(hash.clone()));
        }
        let sizes: BTreeMap<&String, usize> = groups.iter().map(|(k, v)| (k, v.len())).collect();
        Ok(StepOutput {
            kind: "dataset".into(),
            items,
            meta: serde_json::json!({ "group_sizes": sizes, "input_meta": input.manifest.meta }),
            groups,
            ..Default::default()
        })
    }
}

//! The step DAG (petgraph): cycle detection with the cycle printed,
//! topological order, and text / Graphviz DOT / Mermaid renderings.

use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::pipeline::{Pipeline, PipelineError};

/// Edges run from an input to the step that reads it (labelled by slot).
pub struct StepGraph {
    graph: DiGraph<usize, String>,
    nodes: Vec<NodeIndex>,
    order: Vec<usize>,
}

/// How `dag` prints the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    /// Indented text, one step a line.
    Text,
    /// Graphviz DOT.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

impl StepGraph {
    /// Builds the graph; a cycle is an error that prints it.
    pub fn build(p: &Pipeline) -> Result<Self, PipelineError> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..p.steps.len()).map(|i| graph.add_node(i)).collect();
        for (i, s) in p.steps.iter().enumerate() {
            for (slot, refs) in &s.inputs {
                for r in refs {
                    for dep in r.steps() {
                        let j = p.index(dep).expect("references are resolved");
                        graph.add_edge(nodes[j], nodes[i], slot.clone());
                    }
                }
            }
        }
        let order = match toposort(&graph, None) {
            Ok(_) => declaration_order(&graph, &nodes),
            Err(c) => {
                let mut cycle = find_cycle(&graph, c.node_id());
                // Start at the step declared first: stable, and easy to find.
                let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap_or(0);
                cycle.rotate_left(first);
                let names: Vec<&str> = cycle.iter().map(|&i| p.steps[i].name.as_str()).collect();
                let first = &p.steps[cycle[0]];
                return Err(PipelineError::at(
                    first.location.clone(),
                    format!(
                        "the steps form a cycle: {} → {}",
                        names.join(" → "),
                        names[0]
                    ),
                )
                .with_hint("a step cannot depend, directly or through others, on its own output"));
            }
        };
        Ok(StepGraph {
            graph,
            nodes,
            order,
        })
    }

    /// Step indices, inputs before the steps that read them.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Direct inputs of a step.
    pub fn inputs_of(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Incoming)
            .map(|n| self.graph[n])
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Direct readers of a step.
    pub fn dependents_of(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A step and everything it needs, transitively.
    pub fn ancestors_with(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![i];
        while let Some(x) = stack.pop() {
            if !std::mem::replace(&mut seen[x], true) {
                stack.extend(self.inputs_of(x));
            }
        }
        (0..seen.len()).filter(|&k| seen[k]).collect()
    }

    /// Renders the graph.
    pub fn render(&self, p: &Pipeline, format: DagFormat) -> String {
        let mut out = String::new();
        match format {
            DagFormat::Text => {
                for &i in &self.order {
                    let s = &p.steps[i];
                    out.push_str(&format!("{} ({})", s.name, s.kind.name()));
                    let mut ins: Vec<String> = Vec::new();
                    for (slot, refs) in &s.inputs {
                        for r in refs {
                            let g = r
                                .group
                                .as_ref()
                                .map(|g| format!(".{g}"))
                                .unwrap_or_default();
                            let sel = r
                                .select
                                .as_ref()
                                .map(|s| format!("@{s}"))
                                .unwrap_or_default();
                            ins.push(format!("{slot}: {}{sel}{g}", r.step));
                        }
                    }
                    if !ins.is_empty() {
                        out.push_str(&format!("  ← {}", ins.join(", ")));
                    }
                    out.push('\n');
                }
            }
            DagFormat::Dot => {
                out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n", p.name));
                for &i in &self.order {
                    let s = &p.steps[i];
                    out.push_str(&format!(
                        "  \"{}\" [label=\"{}\\n({})\", shape=box];\n",
                        s.name,
                        s.name,
                        s.kind.name()
                    ));
                }
                for e in self.graph.edge_references() {
                    let (a, b) = (
                        &p.steps[self.graph[e.source()]],
                        &p.steps[self.graph[e.target()]],
                    );
                    out.push_str(&format!(
                        "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
                        a.name,
                        b.name,
                        e.weight()
                    ));
                }
                out.push_str("}\n");
            }
            DagFormat::Mermaid => {
                out.push_str("flowchart LR\n");
                let id = |i: usize| format!("s{i}");
                for &i in &self.order {
                    let s = &p.steps[i];
                    out.push_str(&format!(
                        "  {}[\"{}<br/>({})\"]\n",
                        id(i),
                        s.name,
                        s.kind.name()
                    ));
                }
                for e in self.graph.edge_references() {
                    out.push_str(&format!(
                        "  {} -->|{}| {}\n",
                        id(self.graph[e.source()]),
                        e.weight(),
                        id(self.graph[e.target()])
                    ));
                }
            }
        }
        out
    }
}

/// Topological order that keeps declaration order wherever the edges allow
/// (Kahn's algorithm, always taking the earliest-declared ready step).
fn declaration_order(g: &DiGraph<usize, String>, nodes: &[NodeIndex]) -> Vec<usize> {
    let mut indeg: Vec<usize> = nodes
        .iter()
        .map(|&n| g.neighbors_directed(n, Direction::Incoming).count())
        .collect();
    let mut ready: std::collections::BTreeSet<usize> =
        (0..nodes.len()).filter(|&i| indeg[i] == 0).collect();
    let mut out = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        out.push(i);
        for m in g.neighbors_directed(nodes[i], Direction::Outgoing) {
            let j = g[m];
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    out
}

/// Finds one cycle through `start` (which toposort reported), as step indices.
fn find_cycle(g: &DiGraph<usize, String>, start: NodeIndex) -> Vec<usize> {
    // DFS from start until we come back to it; keep the path.
    fn dfs(
        g: &DiGraph<usize, String>,
        n: NodeIndex,
        start: NodeIndex,
        path: &mut Vec<NodeIndex>,
        seen: &mut Vec<bool>,
    ) -> bool {
        for m in g.neighbors_directed(n, Direction::Outgoing) {
            if m == start {
                return true;
            }
            if !seen[m.index()] {
                seen[m.index()] = true;
                path.push(m);
                if dfs(g, m, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start];
    let mut seen = vec![false; g.node_count()];
    seen[start.index()] = true;
    if !dfs(g, start, start, &mut path, &mut seen) {
        // toposort reports some node on or after a cycle; search from each.
        for n in g.node_indices() {
            let mut p = vec![n];
            let mut s = vec![false; g.node_count()];
            s[n.index()] = true;
            if dfs(g, n, n, &mut p, &mut s) {
                return p.into_iter().map(|x| g[x]).collect();
            }
        }
    }
    path.into_iter().map(|x| g[x]).collect()
}

//! The step DAG (petgraph): cycles, topological order, text/DOT/Mermaid.

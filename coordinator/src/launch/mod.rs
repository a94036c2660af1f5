//! dgl-coord launch.

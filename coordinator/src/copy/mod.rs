//! dgl-coord copy.

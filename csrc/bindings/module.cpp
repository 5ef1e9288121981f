#include "bindings.h"

NB_MODULE(_C, m) {
  m.doc() = "kvcore native extension (use the `kvcore` package, not this module directly)";
  kvcore::bindings::register_errors(m);
  kvcore::bindings::register_runtime(m);
  kvcore::bindings::register_kv_cache(m);
  kvcore::bindings::register_memory(m);
  kvcore::bindings::register_attention(m);
  kvcore::bindings::register_quant(m);
  kvcore::bindings::register_prefix_cache(m);
  kvcore::bindings::register_comm(m);
}

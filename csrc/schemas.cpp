// Declares the fisher_ext operators from fisher_ext/schemas.def, the file the pure-PyTorch path
// reads too, so the compiled and the fallback ops cannot disagree.
#include <torch/library.h>

TORCH_LIBRARY(fisher_ext, m) {
#define FISHER_EXT_SCHEMA(schema) m.def(schema);
#include "../fisher_ext/schemas.def"
#undef FISHER_EXT_SCHEMA
}

// cnnc device runtime for CUDA: included at the top of every generated .cu.
// Kernels are extern "C" so their names in the cubin are the names in plan.json.
#include <cfloat>
#include <cstdint>

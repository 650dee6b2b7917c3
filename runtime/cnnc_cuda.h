// cnnc device runtime for CUDA: included at the top of every generated .cu.
// Kernels are extern "C" so their names in the cubin are the names in plan.json.
#include <cfloat>
#include <cstdint>

// The spellings that device functions written once for both dialects (cnnc_rng.h) use;
// cnnc_opencl.h defines the same names.
#define CNNC_DEVICE_FN __device__ __forceinline__
#define CNNC_MULHI(a, b) (__umulhi((a), (b)))
#define CNNC_UINT4(x, y, z, w) (make_uint4((x), (y), (z), (w)))

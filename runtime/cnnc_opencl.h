// cnnc device runtime for OpenCL C 1.2: included at the top of every generated .cl.
// OpenCL C has FLT_MAX, fma, fmax, exp, log and tanh built in; the kernels index buffers
// directly (PoCL has no generic address space).

// The spellings that device functions written once for both dialects (cnnc_rng.h) use;
// cnnc_cuda.h defines the same names.
#define CNNC_DEVICE_FN
#define CNNC_MULHI(a, b) (mul_hi((a), (b)))
#define CNNC_UINT4(x, y, z, w) ((uint4)((x), (y), (z), (w)))

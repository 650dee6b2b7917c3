// cnnc device runtime for OpenCL C 1.2: included at the top of every generated .cl.
// OpenCL C has FLT_MAX, fma, fmax, exp, log and tanh built in; nothing else is needed
// by the kernels, which index buffers directly (PoCL has no generic address space).

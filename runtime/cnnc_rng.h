#ifndef CNNC_RNG_H
#define CNNC_RNG_H
// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011): a counter-based generator, so the random word for a value is a
// pure function of (counter, key) and does not depend on which thread, work-group or
// device computes it.  Written once for CUDA and OpenCL C against the prelude's
// CNNC_DEVICE_FN, CNNC_MULHI and CNNC_UINT4; counter and key are passed by value
// (OpenCL C 1.2 has no generic address space).  cnnc.backends.reference_ops.philox4x32_10
// is the same generator, checked against the published known-answer vectors.
CNNC_DEVICE_FN uint4 cnnc_philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2,
                                        unsigned int c3, unsigned int k0, unsigned int k1)
{
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned int hi0 = CNNC_MULHI(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned int hi1 = CNNC_MULHI(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    return CNNC_UINT4(c0, c1, c2, c3);
}
#endif

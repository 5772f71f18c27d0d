// tile_io.cuh — tiles between global and shared memory for the cp.async
// kernels: the padded row layout, and a tile's load.
#pragma once
#include "dtypes.cuh"
#include "mma.cuh"

// Shared tiles of COLS elements per row, rows padded by 16 bytes, so that
// ldmatrix's eight row addresses (and the 32-bit kernels' LDS, efficient
// kernels) fall in distinct banks without a swizzle.
template <typename T, int COLS>
struct PaddedRows {
    static constexpr int PITCH = COLS + 16 / (int)sizeof(T);  // elements
    static constexpr int ROW_BYTES = PITCH * (int)sizeof(T);
    static __device__ __forceinline__ int offset(int row, int chunk) { return row * ROW_BYTES + chunk * 16; }
};

// ROWS x COLS elements from global rows [row0, row0 + ROWS) into a shared
// tile laid out by Layout::offset(row, chunk) (bytes; chunk = 16-byte column
// chunk); rows at or past `rows_valid`, and columns at or past `cols_valid`
// (a multiple of the chunk), become zeros. A thread copies one chunk of
// every ROWS_PER_PASS-th row, walking one pointer, so few registers stay
// live across the main loop.
template <typename T, int ROWS, int COLS, int THREADS, typename Layout>
__device__ __forceinline__ void load_tile(unsigned char* shared, const T* global, long long row_stride, int row0,
                                          int rows_valid, int cols_valid = COLS) {
    constexpr int CHUNK = 16 / sizeof(T);               // elements per chunk
    constexpr int CHUNKS = COLS / CHUNK;
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // head_dim 96: some threads sit out
    static_assert(ROWS_PER_PASS > 0, "a pass covers at least one row");
    if (threadIdx.x >= ROWS_PER_PASS * CHUNKS) return;
    const int r = threadIdx.x / CHUNKS, chunk = threadIdx.x % CHUNKS;
    const bool column_valid = chunk * CHUNK < cols_valid;
    const T* source = global + (long long)(row0 + r) * row_stride + chunk * CHUNK;
#pragma unroll
    for (int pass = 0; pass < (ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS; ++pass) {
        const int row = r + pass * ROWS_PER_PASS;
        if (ROWS % ROWS_PER_PASS != 0 && row >= ROWS) break;
        const bool valid = column_valid && row0 + row < rows_valid;
        cp_async_16(shared + Layout::offset(row, chunk), valid ? source : global, valid);
        source += ROWS_PER_PASS * row_stride;
    }
}

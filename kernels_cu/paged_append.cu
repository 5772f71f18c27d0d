// paged_append.cu — new keys and values written into a paged KV cache, both
// caches in one launch (varattn/paged.py: append_paged_kv).
//
// A warp per new row: its sequence b (batched: row / per_sequence; packed:
// the slot of cu_seqlens_new holding it), its position seqused_k[b] + its
// index within the sequence's new rows, and so its page and slot; the lanes
// copy the row's 16-byte chunks of k and of v. Rows whose page is past the
// table's last column or outside the pool, and rows outside every sequence
// of cu_seqlens_new, are not written. The first `batch` threads write the
// advanced lengths.
#include "varlen.cuh"

#define APPEND_THREADS 256

struct AppendParams {
    const unsigned char* k_new;
    const unsigned char* v_new;
    unsigned char* k_cache;
    unsigned char* v_cache;
    const int* block_table;       // (batch, table_stride)
    const int* seqused_k;         // (batch)
    const int* cu_seqlens_new;    // (batch + 1), or null: per_sequence new rows each
    int* lengths;                 // (batch): seqused_k plus the new rows
    long long k_new_row_stride, v_new_row_stride;  // bytes between new rows
    long long k_page_stride, k_slot_stride;        // bytes between the caches' pages and their rows
    long long v_page_stride, v_slot_stride;
    long long rows;               // new rows in all
    int batch, per_sequence, table_stride, max_pages;
    int page_shift, num_pages;    // page_size = 1 << page_shift
    int k_chunks, v_chunks;       // 16-byte chunks of a row of k and of v (all heads)
};

__device__ __forceinline__ void copy_row(unsigned char* to, const unsigned char* from, int chunks) {
    for (int c = threadIdx.x % 32; c < chunks; c += 32) ((uint4*)to)[c] = ((const uint4*)from)[c];
}

__global__ void __launch_bounds__(APPEND_THREADS) paged_append(const AppendParams a) {
    const long long thread = (long long)blockIdx.x * APPEND_THREADS + threadIdx.x;
    if (thread < a.batch) {
        const int b = (int)thread;
        const int added = a.cu_seqlens_new ? a.cu_seqlens_new[b + 1] - a.cu_seqlens_new[b] : a.per_sequence;
        a.lengths[b] = a.seqused_k[b] + added;
    }
    const long long row = thread / 32;
    if (row >= a.rows) return;
    int b;
    long long within;
    if (a.cu_seqlens_new) {
        b = sequence_of(a.cu_seqlens_new, a.batch, row);
        if (b < 0) return;
        within = row - a.cu_seqlens_new[b];
    } else {
        b = (int)(row / a.per_sequence);
        within = row % a.per_sequence;
    }
    const long long position = a.seqused_k[b] + within;
    if (position < 0 || (position >> a.page_shift) >= a.max_pages) return;
    const int page = a.block_table[(long long)b * a.table_stride + (position >> a.page_shift)];
    if (page < 0 || page >= a.num_pages) return;
    const long long slot = position & ((1 << a.page_shift) - 1);
    copy_row(a.k_cache + page * a.k_page_stride + slot * a.k_slot_stride, a.k_new + row * a.k_new_row_stride, a.k_chunks);
    copy_row(a.v_cache + page * a.v_page_stride + slot * a.v_slot_stride, a.v_new + row * a.v_new_row_stride, a.v_chunks);
}

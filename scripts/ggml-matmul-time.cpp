// Times ggml's matrix multiplication, the CPU kernels llama.cpp runs, for weight types and shapes read
// from stdin, one case per line: "TYPE ROWS COLS TOKENS" (TYPE as ggml names it, in any case: q4_k, f16).
// For each case it prints one JSON line: the seconds of one product, measured REPEATS times, each the
// mean over a batch of products lasting at least BATCH_SECONDS.
//
//   ggml-matmul-time [--threads N] [--repeats R] [--batch-seconds S] [--stream-bytes B]
//
// The weights are quantized from Gaussian values (a few rows, tiled: a kernel's time does not depend on
// the values), the activations are Gaussian float32, as llama.cpp's are. The weights sit where
// llama.cpp's loader puts them: in the first of the CPU's extra buffer types that runs the product
// (the repacked, interleaved layouts its fastest kernels need), else in plain memory. Decoding reads
// every weight once per token, from memory: a product reused in a loop would be timed from the cache
// instead, so the batch cycles through copies of the weight at least STREAM_BYTES in all (default:
// twice the last-level cache). Built and linked against the pinned llama.cpp's own ggml by
// scripts/build-llama-cpp.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <strings.h>
#include <unistd.h>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

static ggml_type type_named(const std::string & name) {  // any case: q4_k is q4_K
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n != nullptr && strcasecmp(name.c_str(), n) == 0 && ggml_blck_size((ggml_type) t) > 0) {
            return (ggml_type) t;
        }
    }
    return GGML_TYPE_COUNT;
}

static void fail(const std::string & line, const char * why) {
    std::printf("{\"case\": \"%s\", \"error\": \"%s\"}\n", line.c_str(), why);
    std::fflush(stdout);
}

struct Weights {
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    std::vector<ggml_tensor *> copies;
};

// `copies` weight tensors in the first buffer type that runs their product, as llama.cpp's loader
// chooses (asking with a batch of 512 tokens); no buffer when none does.
static Weights place_weights(ggml_backend_dev_t cpu, const std::vector<ggml_backend_buffer_type_t> & bufts,
                             ggml_type type, int64_t rows, int64_t cols, int copies) {
    for (ggml_backend_buffer_type_t buft : bufts) {
        Weights weights;
        ggml_init_params params = {ggml_tensor_overhead() * copies, nullptr, true};
        weights.ctx = ggml_init(params);
        for (int c = 0; c < copies; c++) weights.copies.push_back(ggml_new_tensor_2d(weights.ctx, type, cols, rows));
        weights.buffer = ggml_backend_alloc_ctx_tensors_from_buft(weights.ctx, buft);
        ggml_init_params check_params = {ggml_tensor_overhead() * 2, nullptr, true};
        ggml_context * check = ggml_init(check_params);
        ggml_tensor * loader_op = ggml_mul_mat(check, weights.copies[0],
                                               ggml_new_tensor_2d(check, GGML_TYPE_F32, cols, 512));
        const bool runs = weights.buffer != nullptr && ggml_backend_dev_supports_op(cpu, loader_op);
        ggml_free(check);
        if (runs) return weights;
        if (weights.buffer != nullptr) ggml_backend_buffer_free(weights.buffer);
        ggml_free(weights.ctx);
    }
    return Weights();
}

int main(int argc, char ** argv) {
    int threads = 1, repeats = 5;
    double batch_seconds = 0.02;
    const long cache = sysconf(_SC_LEVEL3_CACHE_SIZE) > 0 ? sysconf(_SC_LEVEL3_CACHE_SIZE) : sysconf(_SC_LEVEL2_CACHE_SIZE);
    double stream_bytes = cache > 0 ? 2.0 * cache : double(1 << 30);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--repeats")) repeats = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--batch-seconds")) batch_seconds = std::atof(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--stream-bytes")) stream_bytes = std::atof(argv[i + 1]);
        else { std::fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    ggml_log_set([](ggml_log_level, const char *, void *) {}, nullptr);  // repacking logs every tensor
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    std::vector<ggml_backend_buffer_type_t> weight_bufts;
    auto extra_bufts = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t * b = extra_bufts ? extra_bufts(cpu) : nullptr; b && *b; b++) {
        weight_bufts.push_back(*b);
    }
    weight_bufts.push_back(ggml_backend_dev_buffer_type(cpu));
    std::mt19937 rng(0);
    std::normal_distribution<float> gauss;
    using clock = std::chrono::steady_clock;

    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string name;
        int64_t rows = 0, cols = 0, tokens = 0;
        if (!(in >> name >> rows >> cols >> tokens) || rows <= 0 || cols <= 0 || tokens <= 0) {
            fail(line, "expected TYPE ROWS COLS TOKENS");
            continue;
        }
        const ggml_type type = type_named(name);
        if (type == GGML_TYPE_COUNT) { fail(line, "unknown ggml type"); continue; }
        if (cols % ggml_blck_size(type) != 0) { fail(line, "columns are not a multiple of the type's block"); continue; }

        const size_t weight_bytes = ggml_row_size(type, cols) * rows;
        const int copies = (int) std::max(1.0, std::ceil(stream_bytes / double(weight_bytes)));
        const size_t mem = sizeof(float) * (size_t) (cols + rows) * tokens + ggml_graph_overhead() +
                           4 * ggml_tensor_overhead() + (1u << 20);
        ggml_init_params params = {mem, nullptr, false};
        ggml_context * ctx = ggml_init(params);
        if (ctx == nullptr) { fail(line, "out of memory"); return 1; }
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cols, tokens);
        for (int64_t i = 0; i < cols * tokens; i++) ((float *) x->data)[i] = gauss(rng);
        Weights weights = place_weights(cpu, weight_bufts, type, rows, cols, copies);
        if (weights.buffer == nullptr) { fail(line, "no CPU buffer type runs this product"); ggml_free(ctx); continue; }
        std::vector<ggml_tensor *> & w = weights.copies;
        ggml_tensor * y = ggml_mul_mat(ctx, w[0], x);

        const int64_t sample_rows = rows < 32 ? rows : 32;
        std::vector<float> values(sample_rows * cols), importance(cols, 1.0f);
        for (float & v : values) v = gauss(rng);
        std::vector<uint8_t> quantized(weight_bytes);
        const size_t row_bytes = ggml_row_size(type, cols);
        ggml_quantize_chunk(type, values.data(), quantized.data(), 0, sample_rows, cols, importance.data());
        for (int64_t r = sample_rows; r < rows; r++) {
            std::memcpy(quantized.data() + r * row_bytes, quantized.data() + (r % sample_rows) * row_bytes, row_bytes);
        }
        for (ggml_tensor * t : w) ggml_backend_tensor_set(t, quantized.data(), 0, weight_bytes);  // repacks

        ggml_cgraph * graph = ggml_new_graph(ctx);
        ggml_build_forward_expand(graph, y);
        ggml_cplan plan = ggml_graph_plan(graph, threads, nullptr);
        std::vector<uint8_t> work(plan.work_size);
        plan.work_data = work.data();

        size_t next = 0;
        auto run = [&](int n) {  // each product reads the next copy of the weights
            const auto start = clock::now();
            for (int i = 0; i < n; i++) {
                y->src[0] = w[next++ % copies];
                ggml_graph_compute(graph, &plan);
            }
            return std::chrono::duration<double>(clock::now() - start).count() / n;
        };
        run(std::min(copies, 1 << 20));  // warm-up: threads started, every copy touched
        int batch = 1;  // doubled until one batch lasts BATCH_SECONDS
        while (batch < (1 << 20) && run(batch) * batch < batch_seconds) batch *= 2;
        std::printf("{\"type\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"tokens\": %lld, \"threads\": %d, "
                    "\"buffer\": \"%s\", \"batch\": %d, \"copies\": %d, \"seconds\": [", name.c_str(),
                    (long long) rows, (long long) cols, (long long) tokens, threads,
                    ggml_backend_buft_name(ggml_backend_buffer_get_type(weights.buffer)), batch, copies);
        for (int r = 0; r < repeats; r++) std::printf("%s%.9g", r ? ", " : "", run(batch));
        std::printf("]}\n");
        std::fflush(stdout);
        ggml_backend_buffer_free(weights.buffer);
        ggml_free(weights.ctx);
        ggml_free(ctx);
    }
    return 0;
}

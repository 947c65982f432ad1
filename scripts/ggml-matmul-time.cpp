// Times ggml's matrix multiplication, the CPU kernels llama.cpp runs, for weight types and shapes read
// from stdin, one case per line: "TYPE ROWS COLS TOKENS" (TYPE as ggml names it, in any case: q4_k, f16).
// For each case it prints one JSON line: the seconds of one product, measured REPEATS times, each the
// mean over a batch of products lasting at least BATCH_SECONDS.
//
//   ggml-matmul-time [--threads N] [--repeats R] [--batch-seconds S]
//
// The weights are quantized from Gaussian values (a few rows, tiled: a kernel's time does not depend on
// the values), the activations are Gaussian float32, as llama.cpp's are. Built and linked against the
// pinned llama.cpp's own ggml by scripts/build-llama-cpp.
#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <strings.h>
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

int main(int argc, char ** argv) {
    int threads = 1, repeats = 5;
    double batch_seconds = 0.02;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--repeats")) repeats = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--batch-seconds")) batch_seconds = std::atof(argv[i + 1]);
        else { std::fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
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

        const size_t row_bytes = ggml_row_size(type, cols);
        const size_t mem = row_bytes * rows + sizeof(float) * (size_t) (cols + rows) * tokens +
                           ggml_graph_overhead() + 4 * ggml_tensor_overhead() + (1u << 20);
        ggml_init_params params = {mem, nullptr, false};
        ggml_context * ctx = ggml_init(params);
        if (ctx == nullptr) { fail(line, "out of memory"); continue; }
        ggml_tensor * w = ggml_new_tensor_2d(ctx, type, cols, rows);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cols, tokens);

        const int64_t sample_rows = rows < 32 ? rows : 32;
        std::vector<float> values(sample_rows * cols), importance(cols, 1.0f);
        for (float & v : values) v = gauss(rng);
        ggml_quantize_chunk(type, values.data(), w->data, 0, sample_rows, cols, importance.data());
        for (int64_t r = sample_rows; r < rows; r++) {
            std::memcpy((char *) w->data + r * row_bytes, (char *) w->data + (r % sample_rows) * row_bytes, row_bytes);
        }
        for (int64_t i = 0; i < cols * tokens; i++) ((float *) x->data)[i] = gauss(rng);

        ggml_tensor * y = ggml_mul_mat(ctx, w, x);
        ggml_cgraph * graph = ggml_new_graph(ctx);
        ggml_build_forward_expand(graph, y);
        ggml_cplan plan = ggml_graph_plan(graph, threads, nullptr);
        std::vector<uint8_t> work(plan.work_size);
        plan.work_data = work.data();

        auto run = [&](int n) {
            const auto start = clock::now();
            for (int i = 0; i < n; i++) ggml_graph_compute(graph, &plan);
            return std::chrono::duration<double>(clock::now() - start).count() / n;
        };
        run(1);  // warm-up: threads started, caches filled
        int batch = 1;  // doubled until one batch lasts BATCH_SECONDS
        while (batch < (1 << 20) && run(batch) * batch < batch_seconds) batch *= 2;
        std::printf("{\"type\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"tokens\": %lld, \"threads\": %d, "
                    "\"batch\": %d, \"seconds\": [", name.c_str(), (long long) rows, (long long) cols,
                    (long long) tokens, threads, batch);
        for (int r = 0; r < repeats; r++) std::printf("%s%.9g", r ? ", " : "", run(batch));
        std::printf("]}\n");
        std::fflush(stdout);
        ggml_free(ctx);
    }
    return 0;
}

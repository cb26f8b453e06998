/*
 * qkv-lm: trains a small decoder-only transformer language model on text files and samples
 * text from it.
 *
 *   qkv-lm train --text FILE... [options] --save FILE
 *   qkv-lm generate --load FILE --prompt TEXT [options]
 *
 * Exit status: 0 on success, 2 on bad input (arguments, files, checkpoints, a corpus too short
 * for the context), 1 when training fails (a loss that stops being finite).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lm.h"

static const char *const usages[][2] = {
    {"train", "  qkv-lm train --text FILE... --save FILE [--bpe 0] [--steps 1000] [--layers 4]\n"
              "      [--dim 128] [--heads 4] [--kv-heads HEADS] [--ffn 4*dim*2/3] [--ctx 128]\n"
              "      [--batch 16] [--lr 3e-3] [--min-lr lr/10] [--warmup steps/10]\n"
              "      [--weight-decay 0.1] [--dropout 0] [--eval-every steps/10]\n"
              "      [--eval-windows 64] [--curve BASE] [--export-init FILE] [--seed 0]\n"
              "      [--threads N]\n"},
    {"generate", "  qkv-lm generate --load FILE --prompt TEXT [--tokens 200]\n"
                 "      [--temperature 0.8] [--top-k 0] [--top-p 1] [--seed 0] [--no-cache 1]\n"
                 "      [--threads N]\n"},
};
#define N_COMMANDS 2

static void usage(FILE *f, const char *command) {
    int only = -1;
    for (int i = 0; command && i < N_COMMANDS; i++)
        if (!strcmp(command, usages[i][0])) only = i;
    fputs("usage:\n", f);
    for (int i = 0; i < N_COMMANDS; i++)
        if (only < 0 || only == i) fputs(usages[i][1], f);
}

static bool is_help(const char *arg) {
    return !strcmp(arg, "-h") || !strcmp(arg, "--help");
}

double lm_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static bool parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "qkv-lm: %s takes a whole number from %lld to %lld, not '%s'\n", flag,
                (long long)lo, (long long)hi, s);
        return false;
    }
    *out = v;
    return true;
}

static bool parse_real(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !(v >= lo && v <= hi)) {
        fprintf(stderr, "qkv-lm: %s takes a number from %g to %g, not '%s'\n", flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

static bool parse_flag(lm_options *o, const char *flag, const char *v) {
    if (!strcmp(flag, "--save")) o->save_path = v;
    else if (!strcmp(flag, "--load")) o->load_path = v;
    else if (!strcmp(flag, "--curve")) o->curve_path = v;
    else if (!strcmp(flag, "--export-init")) o->export_path = v;
    else if (!strcmp(flag, "--prompt")) o->prompt = v;
    else if (!strcmp(flag, "--bpe")) return parse_int(flag, v, 0, 1 << 16, &o->bpe_merges);
    else if (!strcmp(flag, "--steps")) return parse_int(flag, v, 0, 10000000, &o->steps);
    else if (!strcmp(flag, "--layers")) return parse_int(flag, v, 1, 256, &o->layers);
    else if (!strcmp(flag, "--dim")) return parse_int(flag, v, 2, 16384, &o->dim);
    else if (!strcmp(flag, "--heads")) return parse_int(flag, v, 1, 1024, &o->heads);
    else if (!strcmp(flag, "--kv-heads")) return parse_int(flag, v, 1, 1024, &o->kv_heads);
    else if (!strcmp(flag, "--ffn")) return parse_int(flag, v, 1, 1 << 18, &o->ffn);
    else if (!strcmp(flag, "--ctx")) return parse_int(flag, v, 1, 1 << 16, &o->context);
    else if (!strcmp(flag, "--batch")) return parse_int(flag, v, 1, 65536, &o->batch);
    else if (!strcmp(flag, "--warmup")) return parse_int(flag, v, 0, 10000000, &o->warmup);
    else if (!strcmp(flag, "--eval-every"))
        return parse_int(flag, v, 0, 10000000, &o->eval_every);
    else if (!strcmp(flag, "--eval-windows"))
        return parse_int(flag, v, 1, 10000000, &o->eval_windows);
    else if (!strcmp(flag, "--seed")) return parse_int(flag, v, 0, INT64_MAX, &o->seed);
    else if (!strcmp(flag, "--threads")) return parse_int(flag, v, 1, 1024, &o->threads);
    else if (!strcmp(flag, "--tokens")) return parse_int(flag, v, 0, 1 << 24, &o->tokens);
    else if (!strcmp(flag, "--top-k")) return parse_int(flag, v, INT64_MIN, INT64_MAX, &o->top_k);
    else if (!strcmp(flag, "--lr")) return parse_real(flag, v, 0, 10, &o->lr);
    else if (!strcmp(flag, "--min-lr")) return parse_real(flag, v, 0, 10, &o->min_lr);
    else if (!strcmp(flag, "--weight-decay"))
        return parse_real(flag, v, 0, 10, &o->weight_decay);
    else if (!strcmp(flag, "--dropout")) return parse_real(flag, v, 0, 0.99, &o->dropout);
    else if (!strcmp(flag, "--temperature"))
        return parse_real(flag, v, 0, 100, &o->temperature);
    else if (!strcmp(flag, "--top-p")) return parse_real(flag, v, -1e300, 1e300, &o->top_p);
    else if (!strcmp(flag, "--no-cache")) {
        int64_t on;
        if (!parse_int(flag, v, 0, 1, &on)) return false;
        o->no_cache = on;
    } else {
        fprintf(stderr, "qkv-lm: unknown option %s\n", flag);
        return false;
    }
    return true;
}

/* --text takes every value up to the next flag. */
static int parse_texts(int argc, char **argv, int i, lm_options *o) {
    int first = i + 1;
    while (i + 1 < argc && strncmp(argv[i + 1], "--", 2)) i++;
    if (i + 1 == first) {
        fprintf(stderr, "qkv-lm: --text needs at least one file\n");
        return -1;
    }
    o->texts = (const char **)argv + first;
    o->n_texts = i + 1 - first;
    return i + 1;
}

static void set_defaults(lm_options *o) {
    *o = (lm_options){
        .steps = 1000, .layers = 4, .dim = 128, .heads = 4, .context = 128, .batch = 16,
        .warmup = -1, .eval_every = -1, .eval_windows = 64, .lr = 3e-3, .min_lr = -1,
        .weight_decay = 0.1, .tokens = 200, .temperature = 0.8, .top_p = 1,
    };
}

/* Fills in the defaults that depend on other settings and checks that they fit together. */
static bool finish_options(lm_options *o) {
    if (!o->kv_heads) o->kv_heads = o->heads;
    if (!o->ffn) o->ffn = (o->dim * 8 / 3 + 7) / 8 * 8; /* LLaMA's 2/3 of 4 * dim */
    if (o->warmup < 0) o->warmup = o->steps / 10;
    if (o->eval_every < 0) o->eval_every = o->steps / 10 > 0 ? o->steps / 10 : 1;
    if (o->min_lr < 0) o->min_lr = o->lr / 10;
    const char *why = NULL;
    if (o->dim % o->heads) why = "--dim is not divisible by --heads";
    else if (o->heads % o->kv_heads) why = "--heads is not divisible by --kv-heads";
    else if ((o->dim / o->heads) % 2) why = "--dim / --heads is odd (rotary embedding pairs)";
    else if (o->warmup > o->steps) why = "--warmup is more than --steps";
    if (why) fprintf(stderr, "qkv-lm: %s\n", why);
    return !why;
}

static int parse_args(int argc, char **argv, lm_options *o) {
    set_defaults(o);
    for (int i = 2; i < argc; i++)
        if (is_help(argv[i])) {
            usage(stdout, argv[1]);
            return 0;
        }
    for (int i = 2; i < argc;) {
        if (strncmp(argv[i], "--", 2)) {
            fprintf(stderr, "qkv-lm: unexpected argument '%s' (flags are --name value)\n",
                    argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "--text")) {
            if ((i = parse_texts(argc, argv, i, o)) < 0) return 2;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "qkv-lm: %s needs a value\n", argv[i]);
            return 2;
        }
        if (!parse_flag(o, argv[i], argv[i + 1])) return 2;
        i += 2;
    }
    return finish_options(o) ? -1 : 2;
}

static bool require(const char *what, const void *value, const char *command) {
    if (value) return true;
    fprintf(stderr, "qkv-lm %s: %s is required\n", command, what);
    usage(stderr, command);
    return false;
}

int main(int argc, char **argv) {
    if (argc < 2 || is_help(argv[1])) {
        usage(argc < 2 ? stderr : stdout, NULL);
        return argc < 2 ? 2 : 0;
    }
    lm_options o;
    int status = parse_args(argc, argv, &o);
    if (status >= 0) return status;
    if (o.threads > 0) qkv_set_num_threads((int)o.threads);
    const char *cmd = argv[1];
    if (!strcmp(cmd, "train")) {
        if (!require("--text", o.texts, cmd) || !require("--save", o.save_path, cmd)) return 2;
        return lm_train(&o);
    }
    if (!strcmp(cmd, "generate")) {
        if (!require("--load", o.load_path, cmd) || !require("--prompt", o.prompt, cmd))
            return 2;
        return lm_generate(&o);
    }
    fprintf(stderr, "qkv-lm: unknown command '%s'\n", cmd);
    usage(stderr, NULL);
    return 2;
}

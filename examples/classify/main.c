/*
 * qkv-classify: trains a transformer text classifier on `label<TAB>text` files, evaluates it,
 * saves it, and predicts labels for new text.
 *
 *   qkv-classify train --train FILE --test FILE [options] [--save FILE]
 *   qkv-classify eval --load FILE --test FILE
 *   qkv-classify predict --load FILE < texts
 *
 * Under `mpirun -np N` the same commands run data-parallel on N processes (docs/
 * distributed.md): training splits every global batch into --micro-batches M parts (M = N
 * when not given), and its results are the same bits at every N for the same M, also in one
 * process without mpirun. Only rank 0 prints and writes the checkpoint. `train --load FILE`
 * continues the run a --save of train wrote after some epoch, at any rank count.
 *
 * Exit status: 0 on success, 2 on bad input (arguments, files, checkpoints, a destination that
 * cannot be saved to), 1 when training fails (a non-finite loss stops it before anything is
 * saved). `qkv-classify COMMAND --help` prints that command's usage.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "classify.h"

/* Each command's usage, in the order `qkv-classify --help` lists them. */
static const char *const usages[][2] = {
    {"train", "  qkv-classify train --train FILE --test FILE [--level word|char] [--epochs 8]\n"
              "      [--batch 32] [--max-len 64] [--dim 64] [--heads 4] [--layers 1]\n"
              "      [--ffn 256] [--dropout 0.1] [--lr 1e-3] [--min-count 2] [--seed 0]\n"
              "      [--threads N] [--micro-batches M] [--bf16] [--save FILE] [--load FILE]\n"},
    {"eval", "  qkv-classify eval --load FILE --test FILE [--threads N]\n"},
    {"predict", "  qkv-classify predict --load FILE [--threads N] < texts\n"},
};
#define N_COMMANDS 3

/* The usage of command, or of every command when it is NULL or unknown. */
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

static bool parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "qkv-classify: %s takes a whole number from %lld to %lld, not '%s'\n",
                flag, (long long)lo, (long long)hi, s);
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
        fprintf(stderr, "qkv-classify: %s takes a number from %g to %g, not '%s'\n", flag, lo,
                hi, s);
        return false;
    }
    *out = v;
    return true;
}

/* One flag and its value; false (with a message) when it is unknown or malformed. */
static bool parse_flag(options *o, const char *flag, const char *value) {
    if (!value) {
        fprintf(stderr, "qkv-classify: %s needs a value\n", flag);
        return false;
    }
    if (!strcmp(flag, "--train")) o->train_path = value;
    else if (!strcmp(flag, "--test")) o->test_path = value;
    else if (!strcmp(flag, "--save")) o->save_path = value;
    else if (!strcmp(flag, "--load")) o->load_path = value;
    else if (!strcmp(flag, "--level")) {
        if (strcmp(value, "word") && strcmp(value, "char")) {
            fprintf(stderr, "qkv-classify: --level is word or char, not '%s'\n", value);
            return false;
        }
        o->level = strcmp(value, "word") ? QKV_TOKENIZE_CHARS : QKV_TOKENIZE_WORDS;
    } else if (!strcmp(flag, "--epochs")) return parse_int(flag, value, 1, 100000, &o->epochs);
    else if (!strcmp(flag, "--batch")) return parse_int(flag, value, 1, 65536, &o->batch);
    else if (!strcmp(flag, "--max-len")) return parse_int(flag, value, 1, 65536, &o->max_len);
    else if (!strcmp(flag, "--dim")) return parse_int(flag, value, 1, 65536, &o->dim);
    else if (!strcmp(flag, "--heads")) return parse_int(flag, value, 1, 1024, &o->heads);
    else if (!strcmp(flag, "--layers")) return parse_int(flag, value, 0, 1024, &o->layers);
    else if (!strcmp(flag, "--ffn")) return parse_int(flag, value, 1, 1 << 20, &o->ffn);
    else if (!strcmp(flag, "--min-count"))
        return parse_int(flag, value, 1, INT64_MAX, &o->min_count);
    else if (!strcmp(flag, "--seed")) return parse_int(flag, value, 0, INT64_MAX, &o->seed);
    else if (!strcmp(flag, "--threads")) return parse_int(flag, value, 1, 1024, &o->threads);
    else if (!strcmp(flag, "--micro-batches")) {
        if (!parse_int(flag, value, 1, 65536, &o->micro_batches)) return false;
        if (o->micro_batches & (o->micro_batches - 1)) {
            fprintf(stderr, "qkv-classify: --micro-batches is a power of two, not %s\n", value);
            return false;
        }
    }
    else if (!strcmp(flag, "--dropout")) return parse_real(flag, value, 0, 0.99, &o->dropout);
    else if (!strcmp(flag, "--lr")) return parse_real(flag, value, 0, 10, &o->lr);
    else {
        fprintf(stderr, "qkv-classify: unknown option %s\n", flag);
        return false;
    }
    return true;
}

/* -1 when the arguments were read into o, else the exit status to end with (0 after
 * --help, which prints the command's usage). */
static int parse_args(int argc, char **argv, options *o) {
    *o = (options){
        .level = QKV_TOKENIZE_WORDS, .epochs = 8, .batch = 32, .max_len = 64, .dim = 64,
        .heads = 4, .layers = 1, .ffn = 256, .dropout = 0.1, .lr = 1e-3, .min_count = 2,
        .seed = 0, .threads = 0,
    };
    for (int i = 2; i < argc; i++)
        if (is_help(argv[i])) {
            usage(stdout, argv[1]);
            return 0;
        }
    for (int i = 2; i < argc; i += 2) {
        if (!strcmp(argv[i], "--bf16") && !strcmp(argv[1], "train")) { /* takes no value */
            o->bf16 = true;
            i--;
            continue;
        }
        if (strncmp(argv[i], "--", 2)) {
            fprintf(stderr, "qkv-classify: unexpected argument '%s' (flags are --name value)\n",
                    argv[i]);
            return 2;
        }
        if (!parse_flag(o, argv[i], i + 1 < argc ? argv[i + 1] : NULL)) return 2;
    }
    if (o->dim % o->heads) {
        fprintf(stderr, "qkv-classify: --dim %lld is not divisible by --heads %lld\n",
                (long long)o->dim, (long long)o->heads);
        return 2;
    }
    return -1;
}

static bool require(const char *what, const char *value, const char *command) {
    if (value) return true;
    fprintf(stderr, "qkv-classify %s: %s is required\n", command, what);
    usage(stderr, command);
    return false;
}

static int run_command(int argc, char **argv) {
    if (argc < 2 || is_help(argv[1])) {
        usage(argc < 2 ? stderr : stdout, NULL);
        return argc < 2 ? 2 : 0;
    }
    options o;
    int status = parse_args(argc, argv, &o);
    if (status >= 0) return status;
    if (o.threads > 0) qkv_set_num_threads((int)o.threads);
    const char *cmd = argv[1];
    if (!strcmp(cmd, "train")) {
        if (!require("--train", o.train_path, cmd) || !require("--test", o.test_path, cmd))
            return 2;
        return run_train(&o);
    }
    if (!strcmp(cmd, "eval")) {
        if (!require("--load", o.load_path, cmd) || !require("--test", o.test_path, cmd))
            return 2;
        return run_eval(&o);
    }
    if (!strcmp(cmd, "predict")) {
        if (!require("--load", o.load_path, cmd)) return 2;
        return run_predict(&o);
    }
    fprintf(stderr, "qkv-classify: unknown command '%s'\n", cmd);
    usage(stderr, NULL);
    return 2;
}

/* Under mpirun every rank runs the command; rank 0 alone prints to stdout. A rank that fails
 * leaves without MPI_Finalize, so that mpirun ends the whole job rather than leave the other
 * ranks waiting in a collective. */
int main(int argc, char **argv) {
    if (!qkv_dist_init(&argc, &argv)) {
        fprintf(stderr, "qkv-classify: %s\n", qkv_error());
        return 2;
    }
    if (qkv_dist_rank() != 0 && !freopen("/dev/null", "w", stdout)) {
        fprintf(stderr, "qkv-classify: rank %d: cannot silence stdout\n", qkv_dist_rank());
        return 2;
    }
    int status = run_command(argc, argv);
    if (status == 0 || qkv_dist_size() == 1) qkv_dist_finalize();
    return status;
}

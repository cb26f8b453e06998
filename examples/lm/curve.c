/* The loss curve of a training run: a CSV of the numbers and an SVG chart of them, train and
 * validation loss against step, that any browser opens. */
#include <math.h>
#include <stdio.h>

#include "lm.h"


static bool write_csv(const char *path, const curve_point *pts, int n) {
    FILE *f = fopen(path, "w");
    if (!f) return qkv_set_error("%s: cannot be written", path), false;
    fprintf(f, "step,train_loss,val_loss\n");
    for (int i = 0; i < n; i++) {
        fprintf(f, "%lld,", (long long)pts[i].step);
        if (!isnan(pts[i].train)) fprintf(f, "%.6f", pts[i].train);
        fprintf(f, ",%.6f\n", pts[i].valid);
    }
    return fclose(f) == 0 || (qkv_set_error("%s: write failed", path), false);
}

/* Chart geometry: the plot area inside margins for the tick labels. */
enum { WIDTH = 720, HEIGHT = 440, LEFT = 70, RIGHT = 20, TOP = 40, BOTTOM = 60 };

typedef struct frame {
    double x_max, y_min, y_max;
} frame;

static double px(const frame *fr, double step) {
    return LEFT + (WIDTH - LEFT - RIGHT) * step / fr->x_max;
}
static double py(const frame *fr, double loss) {
    return TOP + (HEIGHT - TOP - BOTTOM) * (fr->y_max - loss) / (fr->y_max - fr->y_min);
}

static void polyline(FILE *f, const frame *fr, const curve_point *pts, int n, bool train,
                     const char *colour) {
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", colour);
    for (int i = 0; i < n; i++) {
        double y = train ? pts[i].train : pts[i].valid;
        if (!isnan(y)) fprintf(f, "%.1f,%.1f ", px(fr, (double)pts[i].step), py(fr, y));
    }
    fprintf(f, "\"/>\n");
}

static void axes(FILE *f, const frame *fr) {
    int x0 = LEFT, x1 = WIDTH - RIGHT, y0 = TOP, y1 = HEIGHT - BOTTOM;
    fprintf(f, "<path d=\"M%d %dV%dH%d\" stroke=\"black\" fill=\"none\"/>\n", x0, y0, y1, x1);
    for (int i = 0; i <= 5; i++) {
        double step = fr->x_max * i / 5, loss = fr->y_min + (fr->y_max - fr->y_min) * i / 5;
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%.0f</text>\n",
                px(fr, step), y1 + 18, step);
        fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.2f</text>\n", x0 - 6,
                py(fr, loss) + 4, loss);
        fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n",
                x0 + 1, x1, py(fr, loss), py(fr, loss));
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">step</text>\n", (x0 + x1) / 2,
            HEIGHT - 20);
    fprintf(f, "<text transform=\"translate(18 %d) rotate(-90)\" text-anchor=\"middle\">"
            "loss (nats per token)</text>\n", (y0 + y1) / 2);
    fprintf(f, "<text x=\"%d\" y=\"24\" font-weight=\"bold\">qkv-lm training</text>\n", x0);
    fprintf(f, "<text x=\"%d\" y=\"24\" fill=\"#1f77b4\">&#8212; train</text>\n", x1 - 190);
    fprintf(f, "<text x=\"%d\" y=\"24\" fill=\"#ff7f0e\">&#8212; validation</text>\n", x1 - 110);
}

static bool write_svg(const char *path, const curve_point *pts, int n, int64_t steps) {
    frame fr = {.x_max = steps > 0 ? (double)steps : 1, .y_min = INFINITY, .y_max = -INFINITY};
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 2; k++) {
            double y = k ? pts[i].valid : pts[i].train;
            if (isnan(y)) continue;
            fr.y_min = fmin(fr.y_min, y);
            fr.y_max = fmax(fr.y_max, y);
        }
    if (!(fr.y_max > fr.y_min)) fr.y_max = fr.y_min + 1; /* a flat or single-point curve */
    fr.y_min = fmax(0, floor(fr.y_min * 2) / 2);
    fr.y_max = ceil(fr.y_max * 2) / 2;
    FILE *f = fopen(path, "w");
    if (!f) return qkv_set_error("%s: cannot be written", path), false;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "font-family=\"sans-serif\" font-size=\"12\">\n", WIDTH, HEIGHT);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    axes(f, &fr);
    polyline(f, &fr, pts, n, true, "#1f77b4");
    polyline(f, &fr, pts, n, false, "#ff7f0e");
    fprintf(f, "</svg>\n");
    return fclose(f) == 0 || (qkv_set_error("%s: write failed", path), false);
}

bool write_curve(const char *base, const curve_point *pts, int n, int64_t steps) {
    char path[4200];
    snprintf(path, sizeof path, "%s.csv", base);
    if (!write_csv(path, pts, n)) return false;
    snprintf(path, sizeof path, "%s.svg", base);
    return write_svg(path, pts, n, steps);
}

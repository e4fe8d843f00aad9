#!/usr/bin/env bash
# Download Llama 2, 3, 3.1 or 3.2 weights from Meta with the presigned URL of Meta's e-mail, and verify
# every file against the model's checklist.chk (md5) on Linux and macOS.
#
#   ./download.sh                                   # asks for the URL, the family and the models
#   ./download.sh --url 'https://...*?Policy=...' --family 3.1 --models 8B,8B-instruct --target ./weights
#   LLAMA_URL=... LLAMA_FAMILY=3 LLAMA_MODELS=8B ./download.sh
#
# Re-running resumes: finished files are left alone and partial ones continue where they stopped.
# Environment: LLAMA_URL, LLAMA_FAMILY, LLAMA_MODELS, TARGET_FOLDER (like the options);
# LLAMA_DOWNLOADER=wget|curl and MD5_TOOL=md5sum|md5 to choose the tools (default: whichever exists).
# Works with the bash 3.2 that macOS ships.

set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo "Families and models (an empty list means all of the family's models):"
    for f in 2 3 3.1 3.2; do echo "  $f: $(all_models "$f")"; done
    echo "  any family: FOLDER:SHARDS for a model folder not listed here"
}

die() {
    echo "error: $*" >&2
    exit 1
}

all_models() {
    case "$1" in
        2) echo "7B,13B,70B,7B-chat,13B-chat,70B-chat" ;;
        3) echo "8B,8B-instruct,70B,70B-instruct" ;;
        3.1) echo "8B,8B-instruct,70B,70B-instruct,405B,405B-instruct,405B-MP16,405B-instruct-MP16" ;;
        3.2) echo "1B,1B-instruct,3B,3B-instruct" ;;
        *) return 1 ;;
    esac
}

# model_info FAMILY MODEL -> "FOLDER SHARDS": the remote folder and its number of consolidated.NN.pth files.
model_info() {
    case "$1:$2" in
        2:7B) echo "llama-2-7b 1" ;;
        2:13B) echo "llama-2-13b 2" ;;
        2:70B) echo "llama-2-70b 8" ;;
        2:7B-chat) echo "llama-2-7b-chat 1" ;;
        2:13B-chat) echo "llama-2-13b-chat 2" ;;
        2:70B-chat) echo "llama-2-70b-chat 8" ;;
        3:8B) echo "Meta-Llama-3-8B 1" ;;
        3:8B-instruct) echo "Meta-Llama-3-8B-Instruct 1" ;;
        3:70B) echo "Meta-Llama-3-70B 8" ;;
        3:70B-instruct) echo "Meta-Llama-3-70B-Instruct 8" ;;
        3.1:8B) echo "Meta-Llama-3.1-8B 1" ;;
        3.1:8B-instruct) echo "Meta-Llama-3.1-8B-Instruct 1" ;;
        3.1:70B) echo "Meta-Llama-3.1-70B 8" ;;
        3.1:70B-instruct) echo "Meta-Llama-3.1-70B-Instruct 8" ;;
        3.1:405B) echo "Meta-Llama-3.1-405B 8" ;;
        3.1:405B-instruct) echo "Meta-Llama-3.1-405B-Instruct 8" ;;
        3.1:405B-MP16) echo "Meta-Llama-3.1-405B-MP16 16" ;;
        3.1:405B-instruct-MP16) echo "Meta-Llama-3.1-405B-Instruct-MP16 16" ;;
        3.2:1B) echo "Llama-3.2-1B 1" ;;
        3.2:1B-instruct) echo "Llama-3.2-1B-Instruct 1" ;;
        3.2:3B) echo "Llama-3.2-3B 1" ;;
        3.2:3B-instruct) echo "Llama-3.2-3B-Instruct 1" ;;
        *:*:*)
            local spec=${2}
            local folder=${spec%%:*} shards=${spec##*:}
            case "$shards" in '' | *[!0-9]*) return 1 ;; esac
            [ "$shards" -ge 1 ] && [ -n "$folder" ] || return 1
            echo "$folder $shards"
            ;;
        *) return 1 ;;
    esac
}

# ---- options, environment, prompts ----------------------------------------------------------------------

URL=${LLAMA_URL:-}
FAMILY=${LLAMA_FAMILY:-}
MODELS=${LLAMA_MODELS-__ask__}
TARGET=${TARGET_FOLDER:-.}
while [ $# -gt 0 ]; do
    case "$1" in
        --url) URL=${2:?--url needs a value}; shift 2 ;;
        --family) FAMILY=${2:?--family needs a value}; shift 2 ;;
        --models) MODELS=${2-}; shift 2 ;;
        --target) TARGET=${2:?--target needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

if [ -z "$URL" ]; then
    read -r -p "Enter the URL from Meta's e-mail: " URL || true
fi
if [ -z "$FAMILY" ]; then
    read -r -p "Which Llama family (2, 3, 3.1, 3.2)? " FAMILY || true
fi
ALL=$(all_models "$FAMILY") || die "unknown family '$FAMILY': choose 2, 3, 3.1 or 3.2"
if [ "$MODELS" = "__ask__" ]; then
    MODELS=""
    read -r -p "Enter the models to download ($ALL), comma-separated, or press Enter for all: " MODELS || true
fi
MODELS=${MODELS// /}
[ -n "$MODELS" ] || MODELS=$ALL

case "$URL" in
    http://*\** | https://*\**) ;;
    "") die "no URL given: paste the whole presigned URL from Meta's e-mail (it contains a '*')" ;;
    *) die "'$URL' is not Meta's presigned URL: it must start with https:// and contain a '*' (copy all of it)" ;;
esac

for m in ${MODELS//,/ }; do
    model_info "$FAMILY" "$m" >/dev/null || die "unknown model '$m' for Llama $FAMILY: choose from $ALL (or FOLDER:SHARDS)"
done

# ---- tools ----------------------------------------------------------------------------------------------

DOWNLOADER=${LLAMA_DOWNLOADER:-}
if [ -z "$DOWNLOADER" ]; then
    if command -v wget >/dev/null 2>&1; then DOWNLOADER=wget
    elif command -v curl >/dev/null 2>&1; then DOWNLOADER=curl
    else die "neither wget nor curl is installed: install one (apt-get install wget, brew install wget)"
    fi
fi
command -v "$DOWNLOADER" >/dev/null 2>&1 || die "LLAMA_DOWNLOADER=$DOWNLOADER is not installed"

MD5=${MD5_TOOL:-}
if [ -z "$MD5" ]; then
    if command -v md5sum >/dev/null 2>&1; then MD5=md5sum   # Linux (coreutils)
    elif command -v md5 >/dev/null 2>&1; then MD5=md5        # macOS
    else die "neither md5sum nor md5 is installed: cannot verify the downloads"
    fi
fi

md5_of() {
    # Both print the hash first: md5sum "HASH  FILE", md5 -r "HASH FILE".
    if [ "$MD5" = md5 ]; then md5 -r "$1"; else md5sum "$1"; fi | cut -d' ' -f1
}

LOG=$(mktemp "${TMPDIR:-/tmp}/llama-download.XXXXXX")
trap 'rm -f "$LOG"' EXIT

# ---- downloading ----------------------------------------------------------------------------------------

explain_failure() {  # explain_failure FILE HTTP_STATUS TOOL_STATUS
    case "$2" in
        403) die "HTTP 403 Forbidden for $1: the presigned URL has expired (it works for 24 hours and a limited
       number of downloads), was copied incompletely, or is for another Llama family than '$FAMILY'.
       Request a new URL from Meta and re-run with it: finished files are kept, partial ones resume." ;;
        404) die "HTTP 404 Not Found for $1: the URL does not serve this file; check the family ('$FAMILY') and
       model names" ;;
        "" | 000) die "downloading $1 failed ($DOWNLOADER exit status $3; see its messages above).
       Re-run the same command to resume: partial files continue where they stopped" ;;
        *) die "HTTP $2 for $1 ($DOWNLOADER exit status $3). Re-run the same command to resume: partial files
       continue where they stopped" ;;
    esac
}

# fetch REMOTE_PATH LOCAL_FILE: download with resume (wget --continue, curl --continue-at -).
fetch() {
    local url=${URL/\*/$1} out=$2 status http
    echo "Downloading $1"
    if [ "$DOWNLOADER" = wget ]; then
        set +e
        wget --continue --tries=5 --waitretry=1 --progress=dot:giga --server-response -O "$out" "$url" 2>&1 |
            tee "$LOG" | grep -v '^  ' >&2
        status=${PIPESTATUS[0]}
        set -e
        http=$(grep -o '^  HTTP/[0-9.]* [0-9]*' "$LOG" | tail -n 1 | awk '{print $2}')
        # A file already complete: the server answers 416 to the range request; wget says so and succeeds.
    else
        # Up to 5 attempts, each resuming where the last stopped (curl's own --retry does not resume).
        local attempt=1
        while :; do
            set +e
            # --fail: an error answer is not written into the file, which may be a partial download.
            http=$(curl --fail --location --continue-at - --silent --show-error \
                --output "$out" --write-out '%{http_code}' "$url")
            status=$?
            set -e
            if [ "$http" = 416 ]; then status=0; fi  # asked to resume a file that is already complete
            if [ "$status" = 0 ] || [ "$attempt" -ge 5 ] || [ "${http:-0}" -ge 400 ]; then break; fi
            echo "  interrupted (curl exit status $status); resuming" >&2
            attempt=$((attempt + 1))
            sleep 1
        done
    fi
    if [ "$status" != 0 ]; then
        if [ -f "$out" ] && [ ! -s "$out" ]; then rm -f "$out"; fi  # nothing arrived: leave no empty file
        explain_failure "$1" "${http:-}" "$status"
    fi
}

# check_checklist FILE: refuse an error page saved as a checklist (the usual sign of an expired URL).
check_checklist() {
    local first
    first=$(head -n 1 "$1" | cut -c1-120)
    if grep -qiE '<(html|!doctype|\?xml|error)' "$1" || grep -qvE '^([0-9a-fA-F]{32} [ *]?[^ ].*)?$' "$1"; then
        rm -f "$1"
        die "$1 is not a list of md5 checksums; it starts with:
       $first
       The server sent an HTML or XML error page instead, usually because the presigned URL has expired or
       was copied incompletely. Request a new URL from Meta and re-run: finished files are kept."
    fi
}

# verify DIR CHECKLIST: every file the checklist names must exist in DIR with that md5.
verify() {
    local dir=$1 list=$2 hash name actual bad=0 count=0
    echo "Checking checksums in $dir against $list ($MD5)"
    while read -r hash name; do
        [ -n "$hash" ] || continue
        name=${name#\*}
        count=$((count + 1))
        if [ ! -f "$dir/$name" ]; then
            echo "MISSING: $dir/$name" >&2
            bad=1
            continue
        fi
        actual=$(md5_of "$dir/$name")
        if [ "$actual" = "$hash" ]; then
            echo "  $name: OK"
        else
            echo "md5 MISMATCH: $dir/$name (expected $hash, got $actual)" >&2
            bad=1
        fi
    done <"$dir/$list"
    if [ "$bad" != 0 ]; then
        die "verification failed in $dir (files above).
       Delete each file named above and re-run to download it again (a file that is already full-size is
       otherwise kept as complete)."
    fi
    echo "Verified $count files in $dir"
}

mkdir -p "$TARGET"
echo "Downloading LICENSE and Acceptable Use Policy"
fetch LICENSE "$TARGET/LICENSE"
if [ "$FAMILY" = 2 ]; then
    fetch USE_POLICY.md "$TARGET/USE_POLICY.md"
    # Llama 2 keeps one SentencePiece tokenizer for all models at the top of the tree.
    fetch tokenizer.model "$TARGET/tokenizer.model"
    fetch tokenizer_checklist.chk "$TARGET/tokenizer_checklist.chk"
    check_checklist "$TARGET/tokenizer_checklist.chk"
    verify "$TARGET" tokenizer_checklist.chk
else
    fetch USE_POLICY "$TARGET/USE_POLICY"
fi

for m in ${MODELS//,/ }; do
    set -- $(model_info "$FAMILY" "$m")
    folder=$1 shards=$2
    echo "Downloading Llama $FAMILY $m into $TARGET/$folder"
    mkdir -p "$TARGET/$folder"
    s=0
    while [ "$s" -lt "$shards" ]; do
        shard=$(printf 'consolidated.%02d.pth' "$s")
        fetch "$folder/$shard" "$TARGET/$folder/$shard"
        s=$((s + 1))
    done
    fetch "$folder/params.json" "$TARGET/$folder/params.json"
    if [ "$FAMILY" != 2 ]; then
        fetch "$folder/tokenizer.model" "$TARGET/$folder/tokenizer.model"
    fi
    fetch "$folder/checklist.chk" "$TARGET/$folder/checklist.chk"
    check_checklist "$TARGET/$folder/checklist.chk"
    verify "$TARGET/$folder" checklist.chk
done
echo "All downloads verified."

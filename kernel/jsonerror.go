package kernel

import "encoding/json"

type errorBody struct {
	Error   string `json:"error"`
	Message string `json:"message,omitempty"`
}

// jsonError encodes {"error": code, "message": message}.
func jsonError(code, message string) []byte {
	b, _ := json.Marshal(errorBody{Error: code, Message: message})
	return b
}

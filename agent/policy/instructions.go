package policy

import (
	"encoding/json"

	agentv1 "github.com/policy-engine/policy-engine/api/agent/v1"
)

// SetHeader sets a header of the current phase's message, replacing any value it had.
func SetHeader(name, value string) *agentv1.Instruction {
	return &agentv1.Instruction{
		Type:    agentv1.InstructionType_SET_HEADER,
		Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: name, Value: value}},
	}
}

// AppendHeader adds a value to a header of the current phase's message.
func AppendHeader(name, value string) *agentv1.Instruction {
	return &agentv1.Instruction{
		Type:    agentv1.InstructionType_SET_HEADER,
		Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: name, Value: value, Append: true}},
	}
}

// RemoveHeader removes a header of the current phase's message.
func RemoveHeader(name string) *agentv1.Instruction {
	return &agentv1.Instruction{
		Type:    agentv1.InstructionType_REMOVE_HEADER,
		Payload: &agentv1.Instruction_Header{Header: &agentv1.HeaderInstruction{Key: name}},
	}
}

// SetBody replaces the body of the current phase's message.
func SetBody(body []byte) *agentv1.Instruction {
	return &agentv1.Instruction{
		Type:    agentv1.InstructionType_SET_BODY,
		Payload: &agentv1.Instruction_Body{Body: &agentv1.BodyInstruction{Body: body}},
	}
}

// SetState records a value for later policies and for the response phase.
func SetState(key, value string) *agentv1.Instruction {
	return &agentv1.Instruction{
		Type:    agentv1.InstructionType_SET_STATE,
		Payload: &agentv1.Instruction_State{State: &agentv1.StateInstruction{Key: key, Value: value}},
	}
}

// ErrorBody is the JSON body of every denial a policy writes.
type ErrorBody struct {
	Error   string `json:"error"`
	Message string `json:"message,omitempty"`
}

// Deny returns a POLICY_DENIED result that answers the client with status, headers and a JSON
// body {"error": code, "message": message}. The body is written by an encoder, so no value can
// break out of its string.
func Deny(status int, code, message string, headers map[string]string) Result {
	body, _ := json.Marshal(ErrorBody{Error: code, Message: message})
	h := make(map[string]string, len(headers)+1)
	for k, v := range headers {
		h[k] = v
	}
	h["content-type"] = "application/json"
	return Result{
		Status:  agentv1.StatusCode_POLICY_DENIED,
		Message: message,
		Instructions: []*agentv1.Instruction{{
			Type: agentv1.InstructionType_IMMEDIATE_RESPONSE,
			Payload: &agentv1.Instruction_ImmediateResponse{ImmediateResponse: &agentv1.ImmediateResponse{
				StatusCode: int32(status),
				Headers:    h,
				Body:       body,
				Details:    code,
			}},
		}},
	}
}

// Allow returns an OK result with the given instructions.
func Allow(instructions ...*agentv1.Instruction) Result {
	return Result{Status: agentv1.StatusCode_OK, Instructions: instructions}
}
